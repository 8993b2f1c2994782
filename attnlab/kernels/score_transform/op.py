"""Launcher and ``torch.library`` custom op of the score-transform forward kernel.

``score_transform_fwd(q, k, v, bias, sinks, scale, cap, causal) -> (out, lse)`` runs the Triton kernel
(``attnlab::score_transform_fwd``, with a fake-tensor rule, so ``torch.compile`` traces through it).
Forward only (no autograd formula is registered: calling it on inputs that require grad raises).
One fixed tile per dtype for now: 64 x 64 (32 x 32 for fp32 and D > 128), 16 x 16 under the interpreter;
no autotuning and no GPU measurement yet.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from attnlab.kernels.score_transform.fwd import score_transform_fwd_kernel
from attnlab.kernels.triton_utils import head_block, interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernel then takes CPU tensors only).
IMPORTED_INTERPRETED = interpreting()


def _tile(q: Tensor) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for these inputs."""
    if IMPORTED_INTERPRETED:
        return 16, 16, 1
    if q.dtype == torch.float32 or head_block(q.shape[-1]) > 128:
        return 32, 32, 4
    return 64, 64, 4


def score_transform_fwd_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    block: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """See :func:`attnlab.kernels.score_transform.naive.score_transform_fwd_naive` for the math. q (B, H,
    N_q, D), k/v (B, H_kv, N_k, D), D <= 256; ``bias`` broadcastable to (B, H, N_q, N_k); ``sinks`` (H,).
    ``block`` = (BLOCK_M, BLOCK_N) overrides the tile (tests)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    for t in (q, k, v):
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= 2**31:
            raise ValueError("one head's (N, D) matrix spans 2^31 elements or more; split the sequence")
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    bm, bn, warps = _tile(q)
    if block is not None:
        bm, bn = block
    bias_t = q if bias is None else bias.expand(b, h, n_q, n_k)
    bias_strides = (0, 0, 0, 0) if bias is None else bias_t.stride()
    sinks_t = q if sinks is None else sinks.float().contiguous()
    block_d = head_block(d)
    grid = (triton.cdiv(n_q, bm), b * h)
    score_transform_fwd_kernel[grid](
        q, k, v, o, lse, bias_t, sinks_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        *bias_strides,
        h, h // h_kv, n_q, n_k, n_k - n_q, d, float(scale), float(cap) if cap > 0 else 1.0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAUSAL=bool(causal), SOFTCAP=cap > 0,
        HAS_BIAS=bias is not None, HAS_SINK=sinks is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
        EVEN_M=n_q % bm == 0, EVEN_N=n_k % bn == 0, EVEN_D=d == block_d,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return o, lse


@torch.library.custom_op("attnlab::score_transform_fwd", mutates_args=())
def score_transform_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    return score_transform_fwd_launch(q, k, v, bias, sinks, scale, cap, causal)


@score_transform_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q if q.stride(-1) == 1 else q.contiguous())
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)
