"""Static plans: made from a mask and the shapes, exact, and cached (least recently used first out).

Two builders give the same plan, field by field (the block path also sets ``pattern_ids``):

- :func:`plan_from_mask` (generic, any position-only mask): evaluates the mask over the whole grid in row
  chunks (memory O(chunk), never N x N at once; time O(N_q x N_k)) and classifies every tile exactly:
  full when every pair of the tile is allowed, partial when some are. A tile sticking out of the matrix
  at a tail is never full (its padding is not allowed): partial unless the mask is empty there.
- :func:`attnlab.plans.blocks.plan_from_rule` (methods whose mask factory has a block rule, see
  :mod:`attnlab.plans.blocks`): classifies tiles from per-block bounds and evaluates the mask only on one
  tile per distinct uncertain pattern (a window's edges), O(NQB x NKB) plus a few tiles; for a mask of
  the diagonal offset (``sliding_window``, ``dilated``, dense causal) with no host synchronisation and a
  few dozen device operations at any length (what a first call at a new length pays for its plan).

:func:`static_plan` and :func:`causal_plan` take the block path when a rule exists, else the generic one.
Inside a ``torch.compile`` region (where a plan is traced, not cached) they take the generic path: the
block path's data-dependent steps (``nonzero``, grouping) would break a ``fullgraph`` trace.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from attnlab.masks import MaskContext, MaskMod, causal_mask
from attnlab.plans.blocks import (
    BlockRule,
    TileGrid,
    block_rule,
    diagonal_keys,
    plan_from_rule,
    register_block_rule,
)
from attnlab.plans.plan import Plan
from attnlab.settings import settings

#: Tile size of static plans (query rows x key columns); FlexAttention takes multiples of its own.
BLOCK = 128
#: How many static plans the cache keeps.
CACHE_SIZE = 64

_cache: OrderedDict[Hashable, Plan] = OrderedDict()
stats = {"builds": 0, "hits": 0}


def plan_from_mask(
    mask_mod: MaskMod,
    n_q: int,
    n_k: int,
    causal: bool,
    device: torch.device | str,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
) -> Plan:
    """The exact static plan of a position-only mask (broadcast over batch and heads: Bp = Hp = 1)."""
    nqb, nkb = -(-n_q // block_q), -(-n_k // block_k)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    kv_idx = torch.arange(nkb * block_k, dtype=torch.int32, device=device)
    kv_valid = kv_idx < n_k
    rows = max(1, settings.mask_chunk_elements // (nkb * block_k) // block_q) * block_q
    partial, full = [], []
    allowed = torch.zeros((), dtype=torch.int64, device=device)
    for r0 in range(0, nqb * block_q, rows):
        q_idx = torch.arange(r0, min(r0 + rows, nqb * block_q), dtype=torch.int32, device=device)
        m = mask_mod(zero, zero, q_idx[:, None], kv_idx[None, :])
        m = m & kv_valid[None, :] & (q_idx < n_q)[:, None]
        allowed += m.sum()
        tiles = m.view(-1, block_q, nkb, block_k)
        any_ = tiles.any(dim=3).any(dim=1)
        all_ = tiles.all(dim=3).all(dim=1)
        partial.append(any_ & ~all_)
        full.append(all_)
    return Plan(
        n_q=n_q,
        n_k=n_k,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        full=torch.cat(full)[None, None],
        partial=torch.cat(partial)[None, None],
        mask_mod=mask_mod,
        kind="static",
        allowed_count=allowed.view(1, 1),
    )


def _cached(key: Hashable, build: Any) -> Plan:
    """The plan for ``key``, built once. Plain dict operations, so ``torch.compile`` can trace a lookup
    (inside a compiled region a cached plan's tensors enter the graph as inputs; nothing is stored)."""
    hit = _cache.get(key)
    if hit is not None:
        if not torch.compiler.is_compiling():
            _cache.move_to_end(key)
            stats["hits"] += 1
        return hit
    plan: Plan = build()
    if not torch.compiler.is_compiling():
        _cache[key] = plan
        stats["builds"] += 1
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


def static_plan(
    spec: Any, params: Any, n_q: int, n_k: int, causal: bool, device: torch.device, block: int = BLOCK
) -> Plan:
    """The plan of a mask-defined method (``spec.mask``) for these shapes and parameters (cached); built
    from the method's block rule when its mask factory has one (:mod:`attnlab.plans.blocks`), else by
    evaluating the mask over the grid."""
    # the mask factory itself (held by the cache, so never a reused id) besides the name: a method
    # registered again under its name with another mask must not get the old one's plan
    key = (spec.name, spec.mask, params.key(), n_q, n_k, causal, str(device), block)

    def build() -> Plan:
        mask_mod = spec.mask(params, MaskContext(n_q, n_k, causal, device))
        rule = block_rule(spec.mask)
        if rule is not None and not torch.compiler.is_compiling():
            return plan_from_rule(mask_mod, rule, params, n_q, n_k, causal, device, block, block)
        return plan_from_mask(mask_mod, n_q, n_k, causal, device, block, block)

    return _cached(key, build)


def causal_plan(n_q: int, n_k: int, device: torch.device, block: int = BLOCK) -> Plan:
    """The plan of dense causal attention (bottom-right aligned) for these shapes (cached)."""
    key = ("causal", n_q, n_k, str(device), block)

    def build() -> Plan:
        mask = causal_mask(None, MaskContext(n_q, n_k, True, device))
        if torch.compiler.is_compiling():
            return plan_from_mask(mask, n_q, n_k, True, device, block, block)
        return plan_from_rule(mask, CAUSAL_RULE, None, n_q, n_k, True, device, block, block)

    return _cached(key, build)


def _causal_classify(params: Any, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """(maybe, full) tiles of :func:`~attnlab.masks.causal_mask`: ``d >= 0`` when causal, else every
    pair; exact, and a tile's mask depends only on its diagonal offset."""
    return grid.causal_range()


#: The block rule of :func:`~attnlab.masks.causal_mask` (dense attention, causal or not).
CAUSAL_RULE = register_block_rule(causal_mask, BlockRule(_causal_classify, diagonal_keys))
