"""``block_local``: blocked local attention — positions are cut into blocks of ``block`` tokens; a query
sees its own block and ``neighbors`` blocks before it (and, when not causal, after it).

::

    causal, block=2, neighbors=1 (x = attends)     causal, block=2, neighbors=0 (pure blocks)
    q0: x . . . . .                                q0: x . . . . .
    q1: x x . . . .                                q1: x x . . . .
    q2: x x x . . .                                q2: . . x . . .
    q3: x x x x . .                                q3: . . x x . .
    q4: . . x x x .                                q4: . . . . x .
    q5: . . x x x x                                q5: . . . . x x

Blocks are cut on positions (query i at ``p = i + N_k - N_q``), so cross-attention shares the key grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans.blocks import BlockRule, TileGrid, register_block_rule
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register


@dataclass(frozen=True)
class BlockLocalParams(Params):
    """``block``: tokens per block (>= 1, default 512); ``neighbors``: blocks seen on each allowed side
    besides the query's own (>= 0, default 1: the previous block, as in blockwise/halo attention)."""

    method = "block_local"
    block: int = 512
    neighbors: int = 1

    def validate(self) -> None:
        self.check_int("block", minimum=1)
        self.check_int("neighbors", minimum=0)


def mask(p: BlockLocalParams, ctx: MaskContext) -> MaskMod:
    # no |distance| or block index reaches n_q + n_k, so capping there keeps the mask and keeps huge
    # values inside the int32 range of ctx.const
    cap = ctx.n_q + ctx.n_k
    block = ctx.const(min(p.block, cap))
    neighbors = ctx.const(min(p.neighbors, cap))

    def block_local(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = ctx.distance(q_idx, kv_idx)
        q_block = torch.div(q_idx + ctx.offset, block, rounding_mode="floor")
        k_block = torch.div(kv_idx, block, rounding_mode="floor")
        return ctx.causal_ok(d) & ((q_block - k_block).abs() <= neighbors)

    return block_local


def _blocks(p: BlockLocalParams, grid: TileGrid) -> tuple[int, int, Tensor, Tensor, Tensor, Tensor]:
    """(block, neighbors, capped as in :func:`mask`; the query and key block-index bounds of each tile)."""
    block, neighbors = min(p.block, grid.cap), min(p.neighbors, grid.cap)
    qb_lo = torch.div(grid.p_first, block, rounding_mode="floor")
    qb_hi = torch.div(grid.p_last, block, rounding_mode="floor")
    kb_lo = torch.div(grid.k_first, block, rounding_mode="floor")
    kb_hi = torch.div(grid.k_last, block, rounding_mode="floor")
    return block, neighbors, qb_lo, qb_hi, kb_lo, kb_hi


def classify(p: BlockLocalParams, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """(maybe, full) tiles of :func:`mask` (see :mod:`attnlab.plans.blocks`): over a tile,
    ``delta = floor(p / block) - floor(j / block)`` takes every value between ``qb_lo - kb_hi`` and
    ``qb_hi - kb_lo``, so ``|delta| <= neighbors`` holds somewhere / everywhere from those bounds; with the
    causal range this gives ``full`` exactly and ``maybe`` soundly (allowed blocks and causal pairs may
    lie in different places of a tile: the token mask decides)."""
    _, neighbors, qb_lo, qb_hi, kb_lo, kb_hi = _blocks(p, grid)
    c_any, c_all = grid.causal_range()
    maybe = (qb_lo - neighbors <= kb_hi) & (qb_hi + neighbors >= kb_lo) & c_any
    full = (qb_lo + neighbors >= kb_hi) & (qb_hi - neighbors <= kb_lo) & c_all
    return maybe, full


def keys(p: BlockLocalParams, grid: TileGrid) -> tuple[Tensor, ...]:
    """Pattern keys: the diagonal offset, and where the tile straddles a block boundary the place of its
    corner in its block (``p_first % block``, ``k_first % block``), which with the offset fixes every
    ``delta`` of the tile; elsewhere ``delta`` is one allowed value (else the tile is not uncertain)."""
    block, _, qb_lo, qb_hi, kb_lo, kb_hi = _blocks(p, grid)
    straddle = (qb_lo != qb_hi) | (kb_lo != kb_hi)
    return (
        grid.d0,
        torch.where(straddle, grid.p_first % block, -1),
        torch.where(straddle, grid.k_first % block, -1),
    )


register_block_rule(mask, BlockRule(classify, keys))


def index_mask(params: BlockLocalParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask written as plain index arithmetic, independently of :func:`mask`.

    Positions are cut into blocks ``[b * block, (b + 1) * block)``; query ``i`` sits at position
    ``pos = i + N_k - N_q``, in block ``b = floor(pos / block)`` (negative for a negative position). It sees
    every key of blocks ``b - neighbors`` to ``b + neighbors``, i.e. keys ``(b - neighbors) * block`` to
    ``(b + neighbors + 1) * block - 1``; when causal, only up to ``pos``.
    """
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        pos = i + n_k - n_q
        b = pos // params.block  # Python's floor division: -1 for pos in [-block, 0)
        first = max((b - params.neighbors) * params.block, 0)
        last = min((b + params.neighbors + 1) * params.block - 1, n_k - 1)
        if causal:
            last = min(last, pos)
        if first <= last:
            out[i, first : last + 1] = True
    return out


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: BlockLocalParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention restricted to ``|floor(p / block) - floor(j / block)| <= neighbors``
    (``p = i + N_k - N_q``), and ``j <= p`` when causal."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    return [{"block": max(128, n // 32), "neighbors": 1}, {"block": max(128, n // 16), "neighbors": 1}]


SPEC = register(
    MethodSpec(
        name="block_local",
        family="static",
        paper="Blockwise Self-Attention for Long Document Understanding (Qiu et al., 2019); HaloNet (Vaswani et al., 2021)",
        summary="own block + `neighbors` previous blocks",
        param_class=BlockLocalParams,
        reference=reference,
        backends=MASK_BACKENDS,
        patterns=ALL_PATTERNS,
        mask=mask,
        index_mask=index_mask,
        test_params=(
            {"block": 16, "neighbors": 1},
            {"block": 7, "neighbors": 0},
            {"block": 40, "neighbors": 2},
        ),
        bench_params=_bench,
    )
)
