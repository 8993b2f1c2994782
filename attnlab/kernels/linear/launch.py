"""Host-side helpers of the linear kernels' launchers (no launch here): block sizes and dot precisions, the
launchers' checks, the gates' chunk-local cumsums in PyTorch and their layouts, the per-kernel launch
options."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.kernels.linear.limits import kernel_refusals
from attnlab.kernels.linear.naive import floor_gate
from attnlab.kernels.triton_utils import head_block, interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (the kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
SUB = 16  # rows of a sub-block (tl.dot's minimum)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) (``triton.cdiv`` is a constexpr function: a few microseconds a call on the host)."""
    return -(-a // b)


def _blocks(dk: int, dv: int) -> tuple[int, int, int, int]:
    """(BK, BKS, BV of the forward / state kernels, BV of the chunk backward). BKS = 16 channels per
    slice of the exact in-sub-block products (16 x 16 x 16 float32: 16 KiB of shared memory each)."""
    bk = head_block(dk)
    bv = head_block(dv)
    return bk, 16, min(bv, 64), bv


def _prec(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _upcast(q: Tensor) -> bool:
    """Dots in float32 where Triton's CPU interpreter would get bfloat16 ones wrong."""
    return IMPORTED_INTERPRETED and q.dtype == torch.bfloat16


def _check(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> None:
    why = kernel_refusals(chunk, q.shape[-1], v.shape[-1])
    if why:
        raise ValueError("; ".join(why))
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q, k (B, H, N, K), v (B, H, N, V)"
        )


def chunk_cumsum(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> Tensor:
    """The chunk-local inclusive cumsum of g, float32 (B, H, NP, K), zero-padded to whole chunks (zeros
    without g); g floored at ``naive.GATE_FLOOR`` first (``floor_gate``: no -inf in the cumsum)."""
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    if g is None:
        return torch.zeros(b, h, np_, dk, dtype=torch.float32, device=device)
    gp = F.pad(floor_gate(g).expand(b, h, n, dk), (0, 0, 0, np_ - n))
    return gp.view(b, h, n_chunks, chunk, dk).cumsum(3).view(b, h, np_, dk)


def chunk_cumsum_scalar(g: Tensor | None, b: int, h: int, n: int, chunk: int, device: torch.device) -> Tensor:
    """The chunk-local inclusive cumsum of a gate with one value per token (g broadcastable to (B, H, N)),
    float32 (B, H, NP), zero-padded to whole chunks (zeros without g); g floored as in ``chunk_cumsum``."""
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    if g is None:
        return torch.zeros(b, h, np_, dtype=torch.float32, device=device)
    gp = F.pad(floor_gate(g).expand(b, h, n), (0, np_ - n))
    return gp.view(b, h, n_chunks, chunk).cumsum(3).view(b, h, np_)


def _scalar_gate(g: Tensor | None, b: int, h: int, n: int, dk: int) -> tuple[bool, Tensor | None]:
    """(whether g holds one value per token, shared by every channel; g as (B, H, N) then, else as
    (B, H, N, K)). A gate broadcast over the channels (stride 0, or a last dim of 1) is scalar."""
    if g is None:
        return True, None
    if g.shape[-1] == 1:  # (not through (B, H, N, K): a select's backward would fill and sum one that size)
        return True, g.expand(b, h, n, 1)[..., 0]
    gx = g.expand(b, h, n, dk)
    if gx.shape[-1] == 1 or gx.stride(-1) == 0:
        return True, gx[..., 0]
    return False, gx


def _gate_code(gc: Tensor) -> int:
    """GATE of the chunk kernels: 2 for per-channel cumsums (B, H, NP, K), 1 for one per token (B, H, NP)."""
    return 2 if gc.dim() == 4 else 1


#: Launch options (num_warps, num_stages) per kernel, overriding the defaults written at each launch:
#: for tuning runs (``benchmarks/linear_bench.py --sweep``); empty in normal use.
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}


def _cfg(name: str, **defaults: int) -> dict[str, int]:
    """The launch options of kernel ``name``: ``defaults`` updated by ``LAUNCH_OVERRIDES[name]``."""
    over = LAUNCH_OVERRIDES.get(name)
    return {**defaults, **over} if over else defaults


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
