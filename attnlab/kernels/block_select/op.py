"""Dispatch of the block selection rule: the Triton pass on CUDA where it applies, else the PyTorch rule.

The Triton pass (``fwd.block_select_kernel``) keeps, among equal ranked scores at the cut, the lowest
columns; ``torch.topk`` leaves that choice unspecified, so on ties the two routes may keep different
(equally scored) tiles. Both the method and its reference select through this function, on the same
device, so they see the same plan."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.block_select.naive import select_blocks_naive

#: the Triton pass takes rows of at most this many key blocks (its row lives in registers) ...
MAX_KERNEL_BLOCKS = 2048
#: ... and at most this many kept tiles per row (one reduction round per kept tile)
MAX_KERNEL_TOPK = 64


def kernel_applies(score: Tensor, topk: int, mass: float) -> bool:
    """Whether :func:`select_blocks` runs the Triton pass for these scores."""
    return score.is_cuda and mass == 0 and score.shape[-1] <= MAX_KERNEL_BLOCKS and topk <= MAX_KERNEL_TOPK


#: (rows per program, warps) of the Triton pass, by row width (its power of two): the first that fits.
#: 1024 wide (block_topk at 128K): one row on two warps, 0.54 ms on the H100 against 0.66 for 4 rows on
#: 4 warps and 0.62-0.88 for the seven others (benchmarks/block_select_probe.py at ad63e36); the other
#: widths are not measured.
SCHEDULES = ((2048, 2, 4), (1024, 1, 2), (256, 8, 4), (0, 8, 2))


def _schedule(block_l: int) -> tuple[int, int]:
    return next((rows, warps) for width, rows, warps in SCHEDULES if block_l >= width)


def select_blocks_kernel(
    score: Tensor,
    *,
    n_q: int,
    n_k: int,
    block: int,
    topk: int,
    causal: bool,
    sink: bool,
    local: bool,
    schedule: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The Triton pass of :func:`~attnlab.kernels.block_select.naive.select_blocks_naive` (``mass`` = 0)
    on fp32 scores (B, H, NQB, NKB); runs wherever Triton does (the CPU interpreter in tests).
    ``schedule``: (rows per program, warps), default from :data:`SCHEDULES`."""
    from attnlab.kernels.block_select.fwd import block_select_kernel

    b, h, nqb, nkb = score.shape
    s = score.to(torch.float32).contiguous()
    full = torch.empty(s.shape, dtype=torch.uint8, device=s.device)
    partial = torch.empty_like(full)
    rows = b * h * nqb
    block_l = max(16, _next_pow2(nkb))
    per, warps = schedule or _schedule(block_l)
    block_select_kernel[(-(-rows // per),)](
        s, full, partial, rows, nqb, nkb, n_q, n_k, n_k - n_q, block, min(topk, nkb),
        CAUSAL=causal, SINK=sink, LOCAL=local, SPAN=int(local and (n_k - n_q) % block != 0), ROWS=per,
        BLOCK_L=block_l, num_warps=warps,
    )  # fmt: skip
    return full.view(torch.bool), partial.view(torch.bool)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def select_blocks(
    score: Tensor,
    *,
    n_q: int,
    n_k: int,
    block: int,
    topk: int,
    mass: float,
    causal: bool,
    sink: bool,
    local: bool,
) -> tuple[Tensor, Tensor]:
    """(full, partial) bool (B, H, NQB, NKB) of the block scores: the Triton pass when
    :func:`kernel_applies`, else the PyTorch rule (see ``naive.select_blocks_naive`` for the rule)."""
    if kernel_applies(score, topk, mass):
        return select_blocks_kernel(
            score, n_q=n_q, n_k=n_k, block=block, topk=topk, causal=causal, sink=sink, local=local
        )
    return select_blocks_naive(
        score, n_q=n_q, n_k=n_k, block=block, topk=topk, mass=mass, causal=causal, sink=sink, local=local
    )
