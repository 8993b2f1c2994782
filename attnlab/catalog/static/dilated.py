"""``dilated``: a sliding window with holes — every ``dilation``-th position, ``window`` keys per side.

::

    causal, window=3, dilation=2 (x = attends)
    q0: x . . . . . .
    q1: . x . . . . .
    q2: x . x . . . .
    q3: . x . x . . .
    q4: x . x . x . .
    q5: . x . x . x .
    q6: . . x . x . x

Longformer's dilated sliding window. attention-gym's ``generate_dilated_sliding_window(W, r)`` (non-causal,
``|q - kv| <= W`` and ``|q - kv| % r == 0``) equals ``window = W // r + 1`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import EXECUTOR_FIRST
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans.blocks import BlockRule, TileGrid, diagonal_keys, register_block_rule
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register


@dataclass(frozen=True)
class DilatedParams(Params):
    """``window``: keys per side, self included (>= 1, default 512); ``dilation``: stride between them
    (>= 1, default 2; 1 is ``sliding_window``). The window spans ``(window - 1) * dilation + 1`` positions."""

    method = "dilated"
    window: int = 512
    dilation: int = 2

    def validate(self) -> None:
        self.check_int("window", minimum=1)
        self.check_int("dilation", minimum=1)


def mask(p: DilatedParams, ctx: MaskContext) -> MaskMod:
    # no |distance| or block index reaches n_q + n_k, so capping there keeps the mask and keeps huge
    # values inside the int32 range of ctx.const
    cap = ctx.n_q + ctx.n_k
    dilation = ctx.const(min(p.dilation, cap))
    span = ctx.const(min(p.window * p.dilation, cap))

    def dilated(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = ctx.distance(q_idx, kv_idx)
        return ctx.causal_ok(d) & (d < span) & (d > -span) & (d % dilation == 0)

    return dilated


def classify(p: DilatedParams, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """(maybe, full) tiles of :func:`mask` (see :mod:`attnlab.plans.blocks`): the allowed ``d`` are the
    multiples of ``dilation`` in ``[lo, span - 1]`` (``lo = 0`` when causal, else ``1 - span``). A tile
    holds one iff its ``d`` range meets ``[lo, span - 1]`` (compared on the whole grid) and the largest
    multiple at most ``min(d_max, span - 1)`` reaches ``max(d_min, lo)`` (checked on those tiles only); it
    is full iff its ``d`` range lies inside and is a single value on the grid (or ``dilation`` is 1).
    Exact; a tile's token mask depends only on its diagonal offset (the pattern key)."""
    dilation = min(p.dilation, grid.cap)
    span = min(p.window * p.dilation, grid.cap)
    lo, hi = (0 if grid.causal else 1 - span), span - 1
    meets, inside = grid.d_range(lo, hi)
    if dilation == 1:
        return meets, inside
    shape = meets.shape
    at = meets.nonzero(as_tuple=True)
    a = torch.clamp(grid.p_first.expand(shape)[at] - grid.k_last.expand(shape)[at], min=lo)
    b = torch.clamp(grid.p_last.expand(shape)[at] - grid.k_first.expand(shape)[at], max=hi)
    maybe = torch.zeros_like(meets)
    maybe[at] = torch.div(b, dilation, rounding_mode="floor") * dilation >= a
    full = inside & (grid.p_first == grid.p_last) & (grid.k_first == grid.k_last)  # one pair per tile
    if bool(full.any()):
        full = full & (grid.d_min % dilation == 0)
    return maybe, full


register_block_rule(mask, BlockRule(classify, diagonal_keys))


def index_mask(params: DilatedParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask written as plain index arithmetic, independently of :func:`mask`.

    Query ``i`` sits at position ``pos = i + N_k - N_q``. It sees the ``window`` keys
    ``pos, pos - dilation, ..., pos - (window - 1) * dilation`` (itself included, every ``dilation``-th
    position behind it) and, when not causal, the ``window - 1`` keys ``pos + dilation, ...,
    pos + (window - 1) * dilation`` ahead of it. Keys outside ``0 .. N_k - 1`` do not exist.
    """
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    reach = (params.window - 1) * params.dilation  # farthest key, in positions, on either side
    for i in range(n_q):
        pos = i + n_k - n_q
        # the first key >= 0 on this row's grid pos + m * dilation (Python's % is never negative)
        first = pos - reach if pos - reach >= 0 else pos % params.dilation
        last = min(pos if causal else pos + reach, n_k - 1)
        if first <= last:
            out[i, first : last + 1 : params.dilation] = True
    return out


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: DilatedParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """Softmax attention restricted to ``p - j = m * dilation`` for ``|m| < window``
    (``p = i + N_k - N_q``; ``m >= 0`` when causal)."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    return [{"window": max(32, n // 64), "dilation": 2}, {"window": max(32, n // 16), "dilation": 2}]


SPEC = register(
    MethodSpec(
        name="dilated",
        family="static",
        paper="Longformer: The Long-Document Transformer (Beltagy et al., 2020), dilated sliding window",
        summary="sliding window over every `dilation`-th position",
        param_class=DilatedParams,
        reference=reference,
        backends=EXECUTOR_FIRST,
        patterns=ALL_PATTERNS,
        mask=mask,
        index_mask=index_mask,
        test_params=(
            {"window": 4, "dilation": 2},
            {"window": 3, "dilation": 3},
            {"window": 50, "dilation": 1},
        ),
        bench_params=_bench,
    )
)
