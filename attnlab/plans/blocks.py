"""Static plans from a block-level rule: work in tiles, the token mask only on distinct uncertain tiles.

The generic builder (:func:`attnlab.plans.static.plan_from_mask`) evaluates the mask over the whole
(N_q, N_k) grid: O(N_q x N_k) element work. A mask method that knows its own shape gives instead a
:class:`BlockRule` of two functions written against a :class:`TileGrid` (per-tile bounds: first / last
query position and first / last key inside the matrix):

- ``classify(params, grid) -> (maybe, full)``, bool, broadcasting to (NQB, NKB): ``maybe`` False means
  the tile is *certainly empty*; ``full`` True means every pair of the tile inside the matrix is allowed.
  It is called once on the whole grid, where the bounds are (NQB, 1) row and (1, NKB) column vectors, so
  it costs a few broadcast comparisons per tile (O(NQB x NKB) small operations, never per token).
- ``keys(params, grid) -> tuple of int64 tensors``: a *pattern key* per tile. Two tiles with equal keys
  (and the same place at the matrix's tails, which :func:`plan_from_rule` adds) must have the same token
  mask. It is called only on the uncertain tiles, where the bounds are (T,) vectors. A mask that depends
  on ``d = p - j`` only keys a tile by its diagonal offset ``d0 = p_first - k_first``.

A rule must be *sound* (``maybe`` False only for empty tiles, ``full`` True only for full ones); it need
not be exact. The tiles that are ``maybe`` but not ``full`` are *uncertain*: :func:`plan_from_rule`
groups them by key, evaluates the method's own ``mask_mod`` on one representative tile per group (the
matrix's edges applied), and gives every tile of the group that tile's verdict (empty / partial / full)
and pair count. The result equals the generic builder's plan field by field (``full``, ``partial``,
``allowed_count``, ``mask_mod``; a tile sticking out of the matrix is never full, its padding not being
allowed), at O(NQB x NKB + U x block_q x block_k) cost, U the number of groups (a window: its two edges,
about 2 tiles; the generic path's work is N_q x N_k elements). It also records the groups as the plan's
``pattern_ids``, from which :func:`tile_patterns` gives the block-sparse executor its distinct tile masks
evaluating one tile per id (the executor's generic path evaluates every partial tile).

Rules are attached to a mask factory with :func:`register_block_rule` (the factory object is the key, so
a rule only ever describes the mask it was written for); :func:`block_rule` looks one up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from attnlab.masks import MaskMod
from attnlab.plans.plan import Plan
from attnlab.plans.rows import distinct_words, packed_rows, unpacked_rows

#: Upper bound on the elements of the representative tiles evaluated at once (memory: bool elements).
EVAL_CHUNK_ELEMENTS = 2**22
#: Counters of :func:`plan_from_rule` since import: plans built, uncertain tiles met, tiles evaluated.
stats = {"builds": 0, "uncertain_tiles": 0, "evaluated_tiles": 0}


@dataclass(frozen=True)
class TileGrid:
    """Tiles of an (N_q, N_k) score matrix cut in (block_q x block_k) tiles, as per-tile bounds.

    Positions are bottom-right aligned: query row ``i`` sits at ``p = i + offset``, ``offset = N_k - N_q``;
    key ``j`` at ``j``; ``d = p - j``. Bounds count only the part of a tile inside the matrix (every tile
    has at least one row and one key there). On the whole grid ``p_first``, ``p_last`` are (NQB, 1) and
    ``k_first``, ``k_last`` (1, NKB); on the uncertain tiles all four are (T,). Integer tensors: int32
    when every position fits with room, else int64; a rule caps its parameters at :attr:`cap` (as the
    mask factories do) so that no number it mixes with these tensors overflows them.
    """

    n_q: int
    n_k: int
    causal: bool
    block_q: int
    block_k: int
    p_first: Tensor
    p_last: Tensor
    k_first: Tensor
    k_last: Tensor

    @staticmethod
    def of(n_q: int, n_k: int, causal: bool, block_q: int, block_k: int, device: torch.device) -> TileGrid:
        """The whole grid of tiles."""
        nqb, nkb = -(-n_q // block_q), -(-n_k // block_k)
        big = n_q + n_k + 2 * (block_q + block_k)
        dtype = torch.int32 if big < 2**30 else torch.int64
        offset = n_k - n_q
        p_first = torch.arange(nqb, device=device, dtype=dtype)[:, None] * block_q + offset
        k_first = torch.arange(nkb, device=device, dtype=dtype)[None, :] * block_k
        return TileGrid(
            n_q,
            n_k,
            causal,
            block_q,
            block_k,
            p_first,
            torch.clamp(p_first + (block_q - 1), max=n_q - 1 + offset),
            k_first,
            torch.clamp(k_first + (block_k - 1), max=n_k - 1),
        )

    def at(self, ti: Tensor, tj: Tensor) -> TileGrid:
        """The same bounds gathered at tiles (``ti``, ``tj``): (T,) vectors."""
        return replace(
            self,
            p_first=self.p_first[ti, 0],
            p_last=self.p_last[ti, 0],
            k_first=self.k_first[0, tj],
            k_last=self.k_last[0, tj],
        )

    @property
    def offset(self) -> int:
        return self.n_k - self.n_q

    @property
    def cap(self) -> int:
        """``N_q + N_k``: no distance or block index reaches it (mask factories cap parameters there)."""
        return self.n_q + self.n_k

    @property
    def device(self) -> torch.device:
        return self.p_first.device

    @property
    def d_min(self) -> Tensor:
        """Smallest ``d = p - j`` over each tile's pairs inside the matrix. Every integer between ``d_min``
        and ``d_max`` occurs in the tile (its pairs form a rectangle)."""
        return self.p_first - self.k_last

    @property
    def d_max(self) -> Tensor:
        """Largest ``d = p - j`` over each tile's pairs inside the matrix."""
        return self.p_last - self.k_first

    @property
    def d0(self) -> Tensor:
        """``p_first - k_first``, int64: a tile's diagonal offset (the pattern key of a mask of ``d``)."""
        return self.p_first.to(torch.int64) - self.k_first.to(torch.int64)

    def d_range(self, lo: int | None, hi: int | None) -> tuple[Tensor, Tensor]:
        """(any, all) per tile for the rule ``lo <= d <= hi`` (None: unbounded on that side), as
        comparisons of row bounds against column bounds (no integer tensor of the grid's size)."""
        true = torch.ones((), dtype=torch.bool, device=self.device)
        any_: Tensor | None = None
        all_: Tensor | None = None
        if lo is not None:  # d_max >= lo: k_first <= p_last - lo; d_min >= lo: k_last <= p_first - lo
            any_ = self.k_first <= self.p_last - lo
            all_ = self.k_last <= self.p_first - lo
        if hi is not None:  # d_min <= hi: k_last >= p_first - hi; d_max <= hi: k_first >= p_last - hi
            any_hi = self.k_last >= self.p_first - hi
            all_hi = self.k_first >= self.p_last - hi
            any_ = any_hi if any_ is None else any_ & any_hi
            all_ = all_hi if all_ is None else all_ & all_hi
        return (true if any_ is None else any_), (true if all_ is None else all_)

    def causal_range(self) -> tuple[Tensor, Tensor]:
        """(any, all) per tile of ``d >= 0`` when the call is causal, else (True, True)."""
        return self.d_range(0 if self.causal else None, None)


Classify = Callable[[Any, TileGrid], tuple[Tensor, Tensor]]
Keys = Callable[[Any, TileGrid], tuple[Tensor, ...]]


@dataclass(frozen=True)
class BlockRule:
    """A mask's tile classification (``classify``) and pattern keys (``keys``); see the module doc."""

    classify: Classify
    keys: Keys


def diagonal_keys(params: Any, grid: TileGrid) -> tuple[Tensor, ...]:
    """Pattern keys of a mask that depends on ``d = p - j`` only: the tile's diagonal offset."""
    return (grid.d0,)


_RULES: dict[Callable[..., Any], BlockRule] = {}


def register_block_rule(mask_factory: Callable[..., Any], rule: BlockRule) -> BlockRule:
    """Attach ``rule`` to a mask factory ``(params, ctx) -> mask_mod``; :func:`static_plan` then builds
    that method's plans with :func:`plan_from_rule`. Returns the rule."""
    _RULES[mask_factory] = rule
    return rule


def block_rule(mask_factory: Callable[..., Any] | None) -> BlockRule | None:
    """The block rule attached to ``mask_factory``, or None (then plans use the generic builder)."""
    return None if mask_factory is None else _RULES.get(mask_factory)


def plan_from_rule(
    mask_mod: MaskMod,
    rule: BlockRule,
    params: Any,
    n_q: int,
    n_k: int,
    causal: bool,
    device: torch.device | str,
    block_q: int,
    block_k: int,
) -> Plan:
    """The exact static plan of the position-only ``mask_mod`` (Bp = Hp = 1), its tiles classified by
    ``rule`` and the token mask evaluated on one tile per group of uncertain tiles with equal keys. Equal,
    field by field, to ``plan_from_mask(mask_mod, ...)`` when the rule is sound and its keys are right."""
    if n_q < 1 or n_k < 1 or block_q < 1 or block_k < 1:
        raise ValueError(
            f"plan_from_rule: need n_q, n_k, block_q, block_k >= 1, got {(n_q, n_k, block_q, block_k)}"
        )
    grid = TileGrid.of(n_q, n_k, causal, block_q, block_k, torch.device(device))
    nqb, nkb, dev = -(-n_q // block_q), -(-n_k // block_k), grid.device
    maybe, sure_full = (t.expand(nqb, nkb) for t in rule.classify(params, grid))
    rows_last, cols_last = n_q - (nqb - 1) * block_q, n_k - (nkb - 1) * block_k
    # certainly full tiles: pairs counted from the tile sizes (the last row / column of tiles may be
    # shorter: subtract what they lack, adding back the corner subtracted twice)
    short_q, short_k = block_q - rows_last, block_k - cols_last
    full = sure_full.clone(memory_format=torch.contiguous_format)
    allowed = (
        torch.count_nonzero(full) * (block_q * block_k)
        - torch.count_nonzero(full[-1]) * (short_q * block_k)
        - torch.count_nonzero(full[:, -1]) * (block_q * short_k)
        + full[-1, -1].to(torch.int64) * (short_q * short_k)
    )
    partial = torch.zeros_like(full)
    if rows_last < block_q:
        partial[-1] = full[-1]
        full[-1] = False
    if cols_last < block_k:
        partial[:, -1] |= full[:, -1]
        full[:, -1] = False

    # pattern ids of partial tiles: 0 / 1 / 2 for certainly full tiles past the query tail / the key
    # tail / both (their mask: the pairs inside the matrix), 3 + group for uncertain tiles found partial
    ids = torch.full((nqb, nkb), -1, dtype=torch.int32, device=dev)
    if rows_last < block_q:
        ids[-1] = torch.where(partial[-1], 0, -1)
    if cols_last < block_k:
        ids[:, -1] = torch.where(partial[:, -1], 1, ids[:, -1])
        if rows_last < block_q:
            ids[-1, -1] = torch.where(partial[-1, -1], 2, -1)

    where = (maybe & ~sure_full).nonzero()  # (T, 2): the uncertain tiles, row-major
    if where.shape[0]:
        ti, tj = where[:, 0], where[:, 1]
        parts = [k.expand(ti.shape).to(torch.int64) for k in rule.keys(params, grid.at(ti, tj))]
        if rows_last < block_q:
            parts.append((ti == nqb - 1).to(torch.int64))
        if cols_last < block_k:
            parts.append((tj == nkb - 1).to(torch.int64))
        group, n_groups = _group(parts, where.shape[0], dev)
        first = torch.full((n_groups,), where.shape[0], dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, group, torch.arange(where.shape[0], device=dev), "amin")
        rep_any, rep_all, rep_count = _evaluate(mask_mod, grid, where[first])
        stats["uncertain_tiles"] += where.shape[0]
        stats["evaluated_tiles"] += n_groups
        t_all = rep_all[group]
        full[ti, tj] = t_all
        t_partial = rep_any[group] & ~t_all
        partial[ti, tj] = t_partial
        ids[ti, tj] = torch.where(t_partial, (group + 3).to(torch.int32), -1)
        allowed = allowed + rep_count[group].sum()
    stats["builds"] += 1
    return Plan(
        n_q=n_q,
        n_k=n_k,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        full=full[None, None],
        partial=partial[None, None],
        mask_mod=mask_mod,
        kind="static",
        allowed_count=allowed.to(torch.int64).view(1, 1),
        pattern_ids=ids[None, None],
    )


def _group(parts: list[Tensor], n: int, device: torch.device) -> tuple[Tensor, int]:
    """(group ids 0..G-1, G) of ``n`` items by the tuple of their key parts (int64 (n,) each): the first
    part's ranks are the ids; each further part is ranked and folded into the running id (kept below
    n * n: no overflow), then ranked again. One ``unique`` (one host sync) per part: the number of groups
    is the length of the last one's values, never a separate ``max().item()``."""
    if not parts:
        return torch.zeros(n, dtype=torch.int64, device=device), 1
    values, group = torch.unique(parts[0], return_inverse=True)
    for part in parts[1:]:
        rank = torch.unique(part, return_inverse=True)[1]
        values, group = torch.unique(group * n + rank, return_inverse=True)
    return group, int(values.shape[0])


def _evaluate(mask_mod: MaskMod, grid: TileGrid, tiles: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(any, all, count) of the token mask over each listed tile (int64 (U, 2) block coordinates), with
    the generic builder's conventions: pairs outside the matrix are not allowed (so a tile sticking out
    is never all)."""
    bq, bk, dev = grid.block_q, grid.block_k, grid.device
    zero = torch.zeros((), dtype=torch.int32, device=dev)
    r = torch.arange(bq, dtype=torch.int32, device=dev)
    c = torch.arange(bk, dtype=torch.int32, device=dev)
    out_any, out_all, out_count = [], [], []
    step = max(1, EVAL_CHUNK_ELEMENTS // (bq * bk))
    for t0 in range(0, tiles.shape[0], step):
        tc = tiles[t0 : t0 + step].to(torch.int32)
        q_idx = (tc[:, 0, None] * bq + r)[:, :, None]  # (T, bq, 1)
        kv_idx = (tc[:, 1, None] * bk + c)[:, None, :]  # (T, 1, bk)
        m = mask_mod(zero, zero, q_idx, kv_idx) & (q_idx < grid.n_q) & (kv_idx < grid.n_k)
        flat = m.reshape(m.shape[0], -1)
        out_any.append(flat.any(dim=1))
        out_all.append(flat.all(dim=1))
        out_count.append(flat.sum(dim=1))
    return torch.cat(out_any), torch.cat(out_all), torch.cat(out_count)


def tile_patterns(plan: Plan, partial: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor] | None:
    """The executor's (pattern id per tile, -1 where not partial; distinct patterns, uint8 (U, block_q,
    block_k)) of ``partial`` (bool (Bp, Hp, NQB, NKB)), from ``plan.pattern_ids``: the token mask is
    evaluated on one tile per id, not on every partial tile. Exactly what the executor's generic
    ``_tile_patterns`` returns: the distinct masks numbered by their first partial tile in row-major
    (b, h, i, j) order. None when the plan has no ids or a partial tile lacks one (then the caller
    evaluates every tile). ``chunk`` is unused (the ids no longer depend on the executor's chunk; kept
    for callers that pass ``TILE_CHUNK``)."""
    if plan.pattern_ids is None:
        return None
    bq, bk, dev = plan.block_q, plan.block_k, partial.device
    pat_grid = torch.full(partial.shape, -1, dtype=torch.int64, device=dev)
    coords = partial.nonzero()  # (T, 4): b, h, i, j, row-major as the generic path lists them
    if coords.shape[0] == 0:
        return pat_grid, torch.zeros(1, bq, bk, dtype=torch.uint8, device=dev)
    b, h, i, j = coords.unbind(1)
    tile_id = plan.pattern_ids.to(dev).expand(partial.shape)[b, h, i, j]
    if bool((tile_id < 0).any()):
        return None
    uid, inverse = torch.unique(tile_id, return_inverse=True)
    n = coords.shape[0]
    first = torch.full((uid.shape[0],), n, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=dev), "amin")
    reps = coords[first].to(torch.int32)
    r = torch.arange(bq, device=dev, dtype=torch.int32)
    c = torch.arange(bk, device=dev, dtype=torch.int32)
    q_idx = (reps[:, 2, None] * bq + r)[:, :, None]
    kv_idx = (reps[:, 3, None] * bk + c)[:, None, :]
    m = (q_idx < plan.n_q) & (kv_idx < plan.n_k)
    if plan.mask_mod is not None:  # in chunks of tiles, bounding the token rule's temporaries
        step = max(1, EVAL_CHUNK_ELEMENTS // (bq * bk))
        m = torch.cat([
            m[s : s + step] & plan.mask_mod(reps[s : s + step, 0, None, None], reps[s : s + step, 1, None, None],
                                            q_idx[s : s + step], kv_idx[s : s + step])
            for s in range(0, reps.shape[0], step)
        ])  # fmt: skip
    words = packed_rows(m.reshape(m.shape[0], -1))  # (64 masks' pairs per word: deduplicated as words)
    rep, same = distinct_words(words)
    distinct = unpacked_rows(words[rep], bq * bk)
    u = distinct.shape[0]
    first_tile = torch.full((u,), n, dtype=torch.int64, device=dev)
    first_tile.scatter_reduce_(0, same, first, "amin")
    order = torch.argsort(first_tile)  # by first occurrence (distinct masks have distinct first tiles)
    number = torch.empty(u, dtype=torch.int64, device=dev)
    number[order] = torch.arange(u, device=dev)
    pat_grid[b, h, i, j] = number[same][inverse]
    return pat_grid, distinct[order].view(u, bq, bk).contiguous()
