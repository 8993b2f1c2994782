"""Row-wise L2 normalisation in one Triton pass forward and one backward (softplus's cosine logits).

:func:`l2_normalize` ``(x) -> x / max(|x|, eps)`` over the last dim, computed in fp32 and returned in x's
dtype: one read of ``x`` and one write (the PyTorch form ``F.normalize(x.float()).to(x.dtype)`` makes four
passes, two of them in fp32, and as many again backward). Backward: ``dx = (dy - y (y . dy)) / max(|x|,
eps)`` with ``y = x / max(|x|, eps)`` recomputed in fp32 from ``x`` (F.normalize's gradient wherever
``|x| > eps``; a row of norm <= eps gets ``dy / eps`` minus its tiny projection, where F.normalize's is
``dy / eps``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.kernels.triton_utils import interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: rows per program
BLOCK_R = 4 if IMPORTED_INTERPRETED else 16


@triton.jit
def _l2norm_fwd_kernel(X, Y, R, N_ROWS, D, EPS, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: offsets past 2**31
    d = tl.arange(0, BLOCK_D)
    rm = rows < N_ROWS
    m2 = rm[:, None] & (d < D)[None, :]
    x = tl.load(X + rows[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), EPS)
    tl.store(Y + rows[:, None] * D + d[None, :], (x * r[:, None]).to(Y.dtype.element_ty), mask=m2)
    tl.store(R + rows, r, mask=rm)


@triton.jit
def _l2norm_bwd_kernel(DY, X, R, DX, N_ROWS, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: offsets past 2**31
    d = tl.arange(0, BLOCK_D)
    rm = rows < N_ROWS
    m2 = rm[:, None] & (d < D)[None, :]
    r = tl.load(R + rows, mask=rm, other=0.0)
    y = tl.load(X + rows[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32) * r[:, None]
    dy = tl.load(DY + rows[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    dx = (dy - y * tl.sum(y * dy, axis=1)[:, None]) * r[:, None]
    tl.store(DX + rows[:, None] * D + d[None, :], dx.to(DX.dtype.element_ty), mask=m2)


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        xc = x.contiguous()
        d = x.shape[-1]
        rows = xc.numel() // max(d, 1)
        y = torch.empty_like(xc)
        r = torch.empty(rows, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(rows, BLOCK_R),)
        _l2norm_fwd_kernel[grid](xc, y, r, rows, d, eps, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(d))
        ctx.save_for_backward(xc, r)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        xc, r = ctx.saved_tensors
        dyc = dy.contiguous()
        d = xc.shape[-1]
        rows = r.numel()
        dx = torch.empty_like(xc)
        grid = (triton.cdiv(rows, BLOCK_R),)
        _l2norm_bwd_kernel[grid](dyc, xc, r, dx, rows, d, BLOCK_R=BLOCK_R, BLOCK_D=triton.next_power_of_2(d))
        return dx, None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / max(|x|_2, eps)`` over the last dim, fp32 inside, x's dtype out; differentiable."""
    return _L2Normalize.apply(x, eps)  # type: ignore[no-any-return]
