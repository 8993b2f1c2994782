"""Token masks: the one definition of a mask-defined method's sparsity, shared by every path.

A mask is a ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` in FlexAttention's convention: True where
query ``q_idx`` may attend to key ``kv_idx``. It is evaluated elementwise and broadcasts, so the same
function builds the reference's dense mask, the method's sparsity plan (:mod:`attnlab.plans`) and
runs inside the compiled FlexAttention kernel. attnlab's static masks depend on positions only (not on batch or head).

A method writes a *mask factory* ``(params, ctx) -> mask_mod``. Run-time values (the query offset,
whether the call is causal, window sizes) are captured as 0-d tensors made by :class:`MaskContext`, not
as Python numbers, so one compiled FlexAttention kernel serves every length and parameter value instead
of recompiling for each.

Positions: query ``i`` sits at position ``p = i + (N_k - N_q)`` (bottom-right alignment, see
:mod:`attnlab.patterns`); ``distance = p - j`` is how far key ``j`` lies behind the query (negative: ahead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import DenseTooLargeError
from attnlab.settings import settings

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class MaskContext:
    """Run-time values for one (N_q, N_k, causal, device), as captured by mask closures.

    Outside ``torch.compile`` they are 0-d int32/bool tensors, so one compiled FlexAttention kernel
    serves every length and parameter value. Inside a user's compiled region they are Python numbers:
    the outer graph specialises on them (as it would on any Python constant), and no tensor is created
    inside the graph for the kernel to capture.
    """

    def __init__(self, n_q: int, n_k: int, causal: bool, device: torch.device | str) -> None:
        self.n_q = n_q
        self.n_k = n_k
        self.is_causal = causal
        self.device = torch.device(device)
        self.as_tensors = not torch.compiler.is_compiling()
        self.offset = self.const(n_k - n_q)
        self.not_causal: Tensor | bool = (
            torch.full((), not causal, dtype=torch.bool, device=self.device)
            if self.as_tensors
            else not causal
        )

    def const(self, value: int) -> Any:
        """``value`` as a 0-d int32 tensor on the context's device (or a Python int under compile)."""
        if not self.as_tensors:
            return int(value)
        # (torch.full: a fill on the device; torch.tensor would copy from pageable host memory, which
        # blocks the host on CUDA)
        return torch.full((), int(value), dtype=torch.int32, device=self.device)

    def distance(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """``p - j``: how many positions key ``kv_idx`` lies behind query ``q_idx`` (negative: ahead)."""
        return q_idx + self.offset - kv_idx

    def causal_ok(self, distance: Tensor) -> Tensor:
        """True where causality allows the pair: always when not causal, else ``distance >= 0``."""
        return (distance >= 0) | self.not_causal


MaskFactory = Callable[[Any, MaskContext], MaskMod]


def causal_mask(params: Any, ctx: MaskContext) -> MaskMod:
    """The plain mask of dense attention: everything, or ``j <= p`` when causal."""

    def causal_or_full(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ctx.causal_ok(ctx.distance(q_idx, kv_idx))

    return causal_or_full


def check_dense_size(elements: int, what: str, fast: str) -> None:
    """Refuse to materialise more than ``settings.max_dense_elements`` score elements."""
    if elements > settings.max_dense_elements:
        raise DenseTooLargeError(
            f"{what} would materialise {elements:,} score elements (an N x N tensor), above the limit of "
            f"{settings.max_dense_elements:,} (attnlab.settings.max_dense_elements). Use {fast}, or raise "
            "the limit if you have the memory."
        )


def dense_mask(mask_mod: MaskMod, n_q: int, n_k: int, device: torch.device | str) -> Tensor:
    """The (N_q, N_k) boolean mask; the caller checks its size first."""
    zero = torch.zeros((), dtype=torch.int32, device=device)
    q_idx = torch.arange(n_q, dtype=torch.int32, device=device)[:, None]
    kv_idx = torch.arange(n_k, dtype=torch.int32, device=device)[None, :]
    return mask_mod(zero, zero, q_idx, kv_idx).expand(n_q, n_k)


def dense_pairs(n_q: int, n_k: int, causal: bool) -> int:
    """Number of (query, key) pairs of dense attention: N_q*N_k, or those with ``j <= p`` when causal."""
    if not causal:
        return n_q * n_k
    offset = n_k - n_q
    total = 0
    # rows whose position p = i + offset lies in [0, n_k): p + 1 keys; p >= n_k: all n_k keys
    first = max(0, -offset)
    last_partial = min(n_q, n_k - offset)  # rows with p < n_k
    if last_partial > first:
        lo, hi = first + offset + 1, last_partial - 1 + offset + 1
        total += (lo + hi) * (hi - lo + 1) // 2
    total += max(0, n_q - max(first, last_partial)) * n_k
    return total


def mask_for(factory: MaskFactory, params: Any, n_q: int, n_k: int, causal: bool, device: Any) -> Tensor:
    """The dense (N_q, N_k) mask of a mask factory, size-checked (for references and dense paths)."""
    check_dense_size(n_q * n_k, "a dense mask", "a fast backend (backend=None)")
    return dense_mask(factory(params, MaskContext(n_q, n_k, causal, device)), n_q, n_k, device)
