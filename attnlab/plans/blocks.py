"""Static plans from a block-level rule: work in tiles, the token mask only on distinct uncertain tiles.

The generic builder (:func:`attnlab.plans.static.plan_from_mask`) evaluates the mask over the whole
(N_q, N_k) grid: O(N_q x N_k) element work. A mask method that knows its own shape gives instead a
:class:`BlockRule` of two functions written against a :class:`TileGrid` (per-tile bounds: first / last
query position and first / last key inside the matrix):

- ``classify(params, grid) -> (maybe, full)``, bool, broadcasting to the bounds' shape: ``maybe`` False
  means the tile is *certainly empty*; ``full`` True means every pair of the tile inside the matrix is
  allowed. It is called on the whole grid, where the bounds are (NQB, 1) row and (1, NKB) column vectors,
  or on (C,) vectors of chosen tiles (the diagonal route below), so it must only broadcast; it costs a
  few comparisons per tile, never per token.
- ``keys(params, grid) -> tuple of int64 tensors``: a *pattern key* per tile. Two tiles with equal keys
  (and the same place at the matrix's tails, which :func:`plan_from_rule` adds) must have the same token
  mask. It is called only on the uncertain tiles, where the bounds are (T,) vectors, on the host. A mask
  that depends on ``d = p - j`` only keys a tile by its diagonal offset ``d0 = p_first - k_first``
  (:func:`diagonal_keys`).

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

Two routes build that plan, equal field by field, each with a constant number of device operations
(the work a first call at a new length pays on a GPU, where every small operation is a launch and every
data-dependent one a host synchronisation):

- *diagonal* (rules keyed by :func:`diagonal_keys`, square tiles: ``sliding_window``, ``dilated`` and
  dense causal): the tiles of one diagonal with the same size have the same mask, so the host classifies
  one tile per class (each full-size diagonal, each tile of a short last row or column: about
  2 x (NQB + NKB) classes), groups the uncertain ones, and sends one buffer; the device evaluates the
  groups' tiles and expands the class table to the grid (a strided window per row, one gather): no host
  synchronisation, about 20 device operations besides the mask's own, whatever the length. The host's
  arithmetic is numpy (about a microsecond an operation; a torch operation on a small CPU tensor costs
  10-20 us of dispatch): its only torch operations are the rule's ``classify``, on CPU tensors that
  share the numpy arrays' memory. Its ``pattern_ids`` equal the
  grid route's when ``classify`` decides a tile from its bounds relative to each other (as every
  registered rule does): the uncertain classes are then exactly the uncertain tiles' keys.
- *grid* (any rule): ``classify`` runs on the whole grid on the device; the uncertain tiles are listed
  (one ``nonzero``) and copied to the host (one small copy) to be grouped there, and their groups' tiles
  go back in one copy to be evaluated: two host synchronisations (plus any the rule's own code makes).

Rules are attached to a mask factory with :func:`register_block_rule` (the factory object is the key, so
a rule only ever describes the mask it was written for); :func:`block_rule` looks one up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
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
        dtype = _bound_dtype(n_q, n_k, block_q, block_k)
        offset = n_k - n_q
        p_first = torch.arange(nqb, device=device, dtype=dtype)[:, None] * block_q + offset
        k_first = torch.arange(nkb, device=device, dtype=dtype)[None, :] * block_k
        return TileGrid._of_firsts(n_q, n_k, causal, block_q, block_k, p_first, k_first)

    @staticmethod
    def _of_firsts(
        n_q: int, n_k: int, causal: bool, block_q: int, block_k: int, p_first: Tensor, k_first: Tensor
    ) -> TileGrid:
        """The grid whose tiles start at query positions ``p_first`` and keys ``k_first`` (their ends
        clamped to the matrix)."""
        return TileGrid(
            n_q,
            n_k,
            causal,
            block_q,
            block_k,
            p_first,
            torch.clamp(p_first + (block_q - 1), max=n_k - 1),
            k_first,
            torch.clamp(k_first + (block_k - 1), max=n_k - 1),
        )

    @staticmethod
    def of_tiles(
        n_q: int, n_k: int, causal: bool, block_q: int, block_k: int, ti: Tensor, tj: Tensor
    ) -> TileGrid:
        """The bounds of the listed tiles (int64 (T,) block coordinates ``ti``, ``tj``) as (T,) vectors on
        their device: the values and integer type of :meth:`of`'s grid gathered there (:meth:`at`)."""
        dtype = _bound_dtype(n_q, n_k, block_q, block_k)
        p_first = (ti * block_q + (n_k - n_q)).to(dtype)
        k_first = (tj * block_k).to(dtype)
        return TileGrid._of_firsts(n_q, n_k, causal, block_q, block_k, p_first, k_first)

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


def _bound_dtype(n_q: int, n_k: int, block_q: int, block_k: int) -> torch.dtype:
    """int32 when every tile bound (and a rule's capped parameter added to one) fits with room."""
    return torch.int32 if n_q + n_k + 2 * (block_q + block_k) < 2**30 else torch.int64


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
    field by field, to ``plan_from_mask(mask_mod, ...)`` when the rule is sound and its keys are right.
    Takes the diagonal route when ``rule.keys`` is :func:`diagonal_keys` and the tiles are square, else
    the grid route (the same plan, every field; see the module doc)."""
    if n_q < 1 or n_k < 1 or block_q < 1 or block_k < 1:
        raise ValueError(
            f"plan_from_rule: need n_q, n_k, block_q, block_k >= 1, got {(n_q, n_k, block_q, block_k)}"
        )
    dev = torch.device(device)
    if rule.keys is diagonal_keys and block_q == block_k:
        codes, allowed = _diagonal_codes(mask_mod, rule, params, n_q, n_k, causal, dev, block_q)
    else:
        codes, allowed = _grid_codes(mask_mod, rule, params, n_q, n_k, causal, dev, block_q, block_k)
    stats["builds"] += 1
    full, partial = codes == FULL, codes >= 0
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
        allowed_count=allowed.view(1, 1),
        pattern_ids=codes.clamp_min_(EMPTY)[None, None],  # (the codes become the ids: no new grid)
    )


#: A tile's code in the builders' int32 (NQB, NKB) grid: FULL, EMPTY, or (>= 0) partial with that pattern
#: id: 0 / 1 / 2 for certainly full tiles past the query tail / the key tail / both (their mask: the pairs
#: inside the matrix), ``GROUP_IDS + g`` for the uncertain tiles of key group g found partial (the groups
#: numbered in the lexicographic order of their keys).
FULL, EMPTY, GROUP_IDS = -2, -1, 3


#: Host int64 vectors (numpy: about a microsecond an operation, no torch dispatch).
Ints = npt.NDArray[np.int64]


class _HostPart(NamedTuple):
    """What the host sends the device, as one int32 ``buffer`` (one copy; a CPU tensor sharing a numpy
    array's memory): a zero (the mask's ``b`` and ``h``); the query rows (``groups`` x block_q) and keys
    (``groups`` x block_k) of each group's representative tile; per group its partial code
    (``GROUP_IDS + g``) and the tiles it stands for; the route's table (``table_len`` entries; the
    diagonal route's). From ``wide_at`` on, the route's int64 index vectors (as pairs of int32; the
    device indexes with them, :meth:`wide`): the grid route's group of each uncertain tile; the diagonal
    route's place of each group in the table, then where each row of the grid starts in the table.
    ``allowed``: pairs counted on the host (certainly full tiles); ``tiles``: the uncertain tiles the
    groups stand for."""

    buffer: Tensor
    groups: int
    table_len: int
    wide_at: int
    allowed: int
    tiles: int

    def table_at(self, block_q: int, block_k: int) -> int:
        """Where the table starts in the buffer."""
        return 1 + self.groups * (block_q + block_k + 2)

    def wide(self, buf: Tensor) -> Tensor:
        """The int64 vectors of ``buf`` (the buffer on its device), a view."""
        return buf[self.wide_at :].view(torch.int64)


def _tails(n_q: int, n_k: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
    """(NQB, NKB, query rows of the last row of tiles, keys of the last column of tiles)."""
    nqb, nkb = -(-n_q // block_q), -(-n_k // block_k)
    return nqb, nkb, n_q - (nqb - 1) * block_q, n_k - (nkb - 1) * block_k


def _diagonal_codes(
    mask_mod: MaskMod,
    rule: BlockRule,
    params: Any,
    n_q: int,
    n_k: int,
    causal: bool,
    device: torch.device,
    block: int,
) -> tuple[Tensor, Tensor]:
    """(codes, allowed pairs int64 0-d) by the diagonal route: the class table of
    :func:`_host_diagonals` in one copy, the uncertain classes' verdicts written into it, then every
    tile's code gathered from its class in one ``index_select``: row ``i`` of the grid is the window of
    NKB entries starting at the table's entry ``NQB - 1 - i`` (tile ``(i, j)``: its diagonal's entry
    ``NQB - 1 - i + j``), a short last row the window of its own classes (the corner included); then
    the short last column of tiles, above the corner, overwritten from its classes."""
    nqb, nkb, rows_last, cols_last = _tails(n_q, n_k, block, block)
    tq, tk = int(rows_last < block), int(cols_last < block)
    host = _host_diagonals(rule, params, n_q, n_k, causal, block)
    buf = host.buffer.to(device, non_blocking=True)  # (from pageable memory: staged, no device sync)
    at = host.table_at(block, block)
    table, wide = buf[at : at + host.table_len], host.wide(buf)
    if host.groups:
        code, pairs = _evaluated(mask_mod, buf, host, n_q, n_k, block, block)
        table.index_put_((wide[: host.groups],), code)
        allowed = pairs + host.allowed
    else:
        allowed = torch.full((), host.allowed, dtype=torch.int64, device=device)
    rows_end = nqb + nkb - 1 + tq * nkb  # (the diagonals' entries, then the short last row's classes)
    codes = table[:rows_end].unfold(0, nkb, 1).index_select(0, wide[host.groups :])  # (a new grid)
    if tk:  # the short last column, above the corner
        codes[: nqb - tq, -1] = table[rows_end:]
    return codes, allowed


def _host_grid(n_q: int, n_k: int, causal: bool, block: int, ti: Ints, tj: Ints) -> TileGrid:
    """:meth:`TileGrid.of_tiles` (square tiles) of host block coordinates, computed in numpy: the same
    values and integer type, as CPU tensors sharing the arrays' memory (no torch operation)."""
    dtype = np.int32 if _bound_dtype(n_q, n_k, block, block) == torch.int32 else np.int64
    p_first, k_first = ti * block + (n_k - n_q), tj * block
    p_last = np.minimum(p_first + (block - 1), n_k - 1)  # (n_q - 1 + offset: the last query's position)
    k_last = np.minimum(k_first + (block - 1), n_k - 1)
    bounds = [torch.from_numpy(b.astype(dtype)) for b in (p_first, p_last, k_first, k_last)]
    return TileGrid(n_q, n_k, causal, block, block, *bounds)


def _host_diagonals(rule: BlockRule, params: Any, n_q: int, n_k: int, causal: bool, block: int) -> _HostPart:
    """The host side of the diagonal route, in numpy (the rule's ``classify`` excepted). Classes of
    tiles: the full-size tiles of each diagonal ``t = i - j``, each tile of a short last row, the corner,
    each tile of a short last column. The tiles of a class have the same bounds up to a shift along the
    diagonal, hence the same mask (a mask of ``d``) and the same verdict of a rule keyed by ``d0``: the
    rule classifies one tile per class; the certainly full classes are counted here, the uncertain ones
    grouped by key (their places in the table sent along). The table holds one code per diagonal of the
    whole grid (entry ``NQB - 1 - t``; EMPTY where no full-size tile lies), then the short last row's
    classes, the corner and the short last column's; the uncertain classes' entries are EMPTY until the
    device writes them. Sent after the places: where each row of the grid starts in the table."""
    nqb, nkb, rows_last, cols_last = _tails(n_q, n_k, block, block)
    tq, tk = int(rows_last < block), int(cols_last < block)
    ni, nj = nqb - tq, nkb - tk  # rows / columns of full-size tiles
    diagonals, i64 = nqb + nkb - 1, np.int64
    t = np.arange(-(nj - 1), ni if ni and nj else -(nj - 1), dtype=i64)  # i - j of each diagonal
    i_first = np.maximum(t, 0)  # the diagonal's tiles: rows i_first .. i_last, each in column i - t
    i_last = np.minimum(t + (nj - 1), ni - 1)
    # the parts: the body's diagonals, the short last row, the corner, the short last column; per part
    # its classes' code when certainly full (FULL in the body, else partial with the tail's id: last row
    # 0, corner 2, column 1) and the pairs inside the matrix of each of their tiles
    counts = [t.shape[0], tq * nj, tq * tk, tk * ni]
    kind = np.repeat(np.array([FULL, 0, 2, 1], dtype=i64), counts)
    pairs = np.repeat(
        np.array([block * block, rows_last * block, rows_last * cols_last, block * cols_last], dtype=i64),
        counts,
    )
    tails = counts[1] + counts[2] + counts[3]
    ci = np.concatenate(
        [i_first, np.full(counts[1] + counts[2], nqb - 1, dtype=i64), np.arange(counts[3], dtype=i64)]
    )
    cj = np.concatenate(
        [i_first - t, np.arange(counts[1], dtype=i64), np.full(counts[2] + counts[3], nkb - 1, dtype=i64)]
    )
    weight = np.concatenate([i_last - i_first + 1, np.ones(tails, dtype=i64)])  # tiles per class
    grid = _host_grid(n_q, n_k, causal, block, ci, cj)
    maybe, sure = (np.broadcast_to(m.numpy(), ci.shape) for m in rule.classify(params, grid))
    allowed = int((pairs * weight)[sure].sum())
    place = np.concatenate([(nqb - 1) - t, np.arange(diagonals, diagonals + tails, dtype=i64)])
    table = np.full(diagonals + tails, EMPTY, dtype=i64)
    table[place] = np.where(sure, kind, EMPTY)
    # the uncertain classes, each its own key group: keys (d0, in the short last row, in the short last
    # column), d0 = (i - j) * block + offset, numbered in lexicographic order (the grid route's numbering)
    uncertain = np.flatnonzero(maybe & ~sure)
    ti, tj = ci[uncertain], cj[uncertain]
    key = (ti - tj) * 4 + (ti == nqb - 1) * (2 * tq) + (tj == nkb - 1) * tk  # (distinct keys)
    order = uncertain[np.argsort(key)]
    starts = np.arange(nqb - 1, -1, -1, dtype=i64)  # row i: entry NQB - 1 - i; a short last row: its own
    if tq:
        starts[-1] = diagonals
    wide = np.concatenate([place[order], starts])
    return _host_part(ci[order], cj[order], weight[order], block, block, allowed, table, wide)


def _grid_codes(
    mask_mod: MaskMod,
    rule: BlockRule,
    params: Any,
    n_q: int,
    n_k: int,
    causal: bool,
    device: torch.device,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor]:
    """(codes, allowed pairs int64 0-d) by the grid route: every tile classified on the device, the
    certainly full ones coded and counted there; the uncertain tiles listed (one ``nonzero``) and copied
    to the host, grouped there (:func:`_host_tiles`), their groups' representative tiles evaluated on the
    device and every uncertain tile given its group's verdict."""
    nqb, nkb, rows_last, cols_last = _tails(n_q, n_k, block_q, block_k)
    short_q, short_k = block_q - rows_last, block_k - cols_last
    grid = TileGrid.of(n_q, n_k, causal, block_q, block_k, device)
    maybe, sure = (m.expand(nqb, nkb) for m in rule.classify(params, grid))
    codes = torch.full((nqb, nkb), EMPTY, dtype=torch.int32, device=device).masked_fill_(sure, FULL)
    # certainly full tiles: pairs from the tile sizes (the last row / column of tiles may be shorter:
    # subtract what they lack, adding back the corner subtracted twice); on a short tail they are partial
    allowed = torch.count_nonzero(sure) * (block_q * block_k)
    if short_q:
        codes[-1].masked_fill_(sure[-1], 0)
        allowed = allowed - torch.count_nonzero(sure[-1]) * (short_q * block_k)
    if short_k:
        codes[:, -1].masked_fill_(sure[:, -1], 1)
        allowed = allowed - torch.count_nonzero(sure[:, -1]) * (block_q * short_k)
    if short_q and short_k:
        codes[-1, -1].masked_fill_(sure[-1, -1], 2)
        allowed = allowed + sure[-1, -1] * (short_q * short_k)
    where = (maybe & ~sure).nonzero()  # (T, 2): the uncertain tiles, row-major (a host sync)
    if where.shape[0]:
        host = _host_tiles(rule, params, where.cpu(), n_q, n_k, causal, block_q, block_k)
        buf = host.buffer.to(device, non_blocking=True)
        code, pairs = _evaluated(mask_mod, buf, host, n_q, n_k, block_q, block_k)
        codes[where[:, 0], where[:, 1]] = code[host.wide(buf)]  # (each tile its group's code)
        allowed = allowed + pairs
    return codes, allowed


def _host_tiles(
    rule: BlockRule, params: Any, where: Tensor, n_q: int, n_k: int, causal: bool, block_q: int, block_k: int
) -> _HostPart:
    """The host side of the grid route: the uncertain tiles (int64 (T, 2), row-major) grouped by key: the
    rule's keys plus, where the last row / column of tiles is short, whether the tile is in it (as in the
    generic builder, a tile's mask stops at the matrix's edges); the groups numbered in the keys'
    lexicographic order, each represented by its first tile."""
    nqb, nkb, rows_last, cols_last = _tails(n_q, n_k, block_q, block_k)
    ti, tj = where[:, 0], where[:, 1]
    n, i64 = ti.shape[0], torch.int64
    grid = TileGrid.of_tiles(n_q, n_k, causal, block_q, block_k, ti, tj)
    parts = [k.expand(n).to(i64) for k in rule.keys(params, grid)]
    if rows_last < block_q:
        parts.append((ti == nqb - 1).to(i64))
    if cols_last < block_k:
        parts.append((tj == nkb - 1).to(i64))
    group, groups = torch.zeros(n, dtype=i64), 1
    for k, part in enumerate(parts):  # the running group id folded with each part's rank (below n * n)
        rank = torch.unique(part, return_inverse=True)[1]
        values, group = torch.unique(group * n + rank if k else rank, return_inverse=True)
        groups = values.shape[0]
    first = torch.full((groups,), n, dtype=i64).scatter_reduce_(0, group, torch.arange(n), "amin")
    tiles = torch.bincount(group, minlength=groups)
    rep_i, rep_j = ti[first].numpy(), tj[first].numpy()
    return _host_part(rep_i, rep_j, tiles.numpy(), block_q, block_k, 0, np.zeros(0, np.int64), group.numpy())


def _host_part(
    rep_i: Ints, rep_j: Ints, tiles: Ints, block_q: int, block_k: int, allowed: int, table: Ints, wide: Ints
) -> _HostPart:
    """The buffer of :class:`_HostPart` from host int64 arrays: per group its representative tile
    (``rep_i``, ``rep_j``) and the tiles it stands for; the route's ``table`` and int64 vectors."""
    groups = rep_i.shape[0]
    q_idx = rep_i[:, None] * block_q + np.arange(block_q)
    kv_idx = rep_j[:, None] * block_k + np.arange(block_k)
    pad = (1 + groups * (block_q + block_k + 2) + table.shape[0]) % 2  # (the int64 vectors aligned)
    codes = np.arange(GROUP_IDS, GROUP_IDS + groups, dtype=np.int64)
    narrow = np.concatenate(
        [np.zeros(1, np.int64), q_idx.ravel(), kv_idx.ravel(), codes, tiles, table, np.zeros(pad, np.int64)]
    )
    buffer = np.concatenate(
        [narrow.astype(np.int32), np.ascontiguousarray(wide, dtype=np.int64).view(np.int32)]
    )
    return _HostPart(
        torch.from_numpy(buffer), groups, table.shape[0], narrow.shape[0], allowed, int(tiles.sum())
    )


def _evaluated(
    mask_mod: MaskMod, buf: Tensor, host: _HostPart, n_q: int, n_k: int, block_q: int, block_k: int
) -> tuple[Tensor, Tensor]:
    """(code of each group, int32 (G,); pairs allowed in the tiles the groups stand for, int64 0-d), on
    ``buf``'s device: the token mask over each group's representative tile, with the generic builder's
    conventions (pairs outside the matrix are not allowed, so a tile sticking out is never full)."""
    g, zero = host.groups, buf[0]
    at = 1 + g * (block_q + block_k)
    q_idx = buf[1 : 1 + g * block_q].view(g, block_q, 1)
    kv_idx = buf[1 + g * block_q : at].view(g, 1, block_k)
    step = max(1, EVAL_CHUNK_ELEMENTS // (block_q * block_k))  # bounding the token rule's temporaries
    counts = []
    for q, kv in zip(q_idx.split(step), kv_idx.split(step), strict=True):
        m = mask_mod(zero, zero, q, kv)
        if n_q % block_q:  # (only a short last row or column of tiles sticks out of the matrix)
            m = m & (q < n_q)
        if n_k % block_k:
            m = m & (kv < n_k)
        counts.append(m.expand(q.shape[0], block_q, block_k).sum((1, 2)))
    count = counts[0] if len(counts) == 1 else torch.cat(counts)
    partial_code, tiles = buf[at : at + g], buf[at + g : at + 2 * g]
    code = partial_code.masked_fill(count == 0, EMPTY).masked_fill_(count == block_q * block_k, FULL)
    stats["uncertain_tiles"] += host.tiles
    stats["evaluated_tiles"] += g
    return code, (count * tiles).sum()


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
