"""A plan in the block-sparse executor's form: index tables and the token masks of its partial tiles.

:func:`executor_tables` turns a :class:`~attnlab.plans.plan.Plan` into :class:`ExecutorTables`, the
plain int32 / uint8 tensors that :mod:`attnlab.kernels.block_sparse` reads (kernels never see a Plan):

- per (Bp, Hp, query block): the partial tiles to visit (key-block index and a *pattern id*), then the
  full tiles, then the token columns;
- the same transposed, per (Bp, Hp, key block), for the backward's dK/dV pass;
- ``patterns``: uint8 (U, block_q, block_k), the distinct token masks of the partial tiles (1 = compute).
  A partial tile's mask is ``mask_mod`` evaluated over the tile (positions past the matrix are 0), so any
  position-defined mask runs exactly; identical tiles (every causal diagonal tile, every window edge at
  the same offset) share one pattern, so U stays small.

Conventions the kernels rely on: a full tile lies inside the matrix (a full tile at the key tail is moved
to the partial list with the pattern of its in-range part); token columns never fall inside a visited
tile of their query block (the plan's token mask counts them only outside, see ``Plan.dense_mask``); a
column list is sorted ascending with -1 padding after the valid entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.plans.blocks import tile_patterns
from attnlab.plans.plan import Plan, sortable
from attnlab.plans.rows import _row_hash_multipliers as _row_hash_multipliers
from attnlab.plans.rows import distinct_words, packed_rows, unpacked_rows

#: Width of the column tables that hold token columns, at least: 1-wide column tables mean "no columns", so
#: the executor's launchers know from shapes alone, without reading the device, whether columns take part
#: (the kernels' copy, which they may not import from here: ``attnlab.kernels.block_sparse.COLUMNS_MIN_WIDTH``).
COLUMNS_MIN_WIDTH = 2

#: Partial tiles whose masks are evaluated at once (memory: this many x block_q x block_k bytes).
TILE_CHUNK = 2048


class ExecutorArgs(tuple):  # type: ignore[type-arg]
    """The 13 tables in the order the executor's custom ops take them (a plain tuple to everything that
    indexes, unpacks or copies it), with what they were built for: ``n_q``, ``n_k`` and the plan's
    ``causal``, host values that :func:`attnlab.kernels.block_sparse.op.block_sparse_attention` and its
    launchers check against q, k and the call (the tile counts alone let tables for one length run on
    another of the same count of tiles). A copy (``tuple(args)``, a list, a slice) drops them."""

    n_q: int
    n_k: int
    causal: bool

    def __new__(cls, tables: tuple[Tensor, ...], n_q: int, n_k: int, causal: bool) -> ExecutorArgs:
        self = super().__new__(cls, tables)
        self.n_q, self.n_k, self.causal = n_q, n_k, causal
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExecutorArgs, (tuple(self), self.n_q, self.n_k, self.causal))


@dataclass(frozen=True, eq=False)
class ExecutorTables:
    """The executor's view of a plan. Every table but ``patterns`` is int32 with a leading (Bp, Hp) pair (1
    broadcasts); ``patterns`` is uint8 (U, block_q, block_k), the partial tiles' distinct masks."""

    block_q: int
    block_k: int
    n_q: int
    n_k: int
    #: the plan's ``causal`` (the kernels apply it to token columns; the tiles carry it in their patterns)
    causal: bool
    #: forward: per (Bp, Hp, NQB)
    p_num: Tensor
    p_idx: Tensor  # (Bp, Hp, NQB, max partial)
    p_pat: Tensor  # pattern id of each listed partial tile
    f_num: Tensor
    f_idx: Tensor  # (Bp, Hp, NQB, max full)
    c_num: Tensor
    c_idx: Tensor  # (Bp, Hp, NQB, C) key tokens, ascending, -1 padded; C = 1: no columns, else C >= 2
    #: backward (dK/dV): per (Bp, Hp, NKB), the query blocks that visit each key block
    tp_num: Tensor
    tp_idx: Tensor
    tp_pat: Tensor
    tf_num: Tensor
    tf_idx: Tensor
    #: uint8 (U, block_q, block_k), U >= 1
    patterns: Tensor

    @property
    def has_columns(self) -> bool:
        """Whether token columns take part, from the tables' shape alone (no device read): the column
        tables of a plan without columns (or whose columns all fall inside visited tiles) are 1 wide, the
        others at least :data:`COLUMNS_MIN_WIDTH`."""
        return self.c_idx.shape[-1] >= COLUMNS_MIN_WIDTH

    def as_args(self) -> ExecutorArgs:
        """The tables in the order the executor's custom ops take them (a tuple that also carries ``n_q``,
        ``n_k`` and ``causal``, see :class:`ExecutorArgs`)."""
        tables = (
            self.p_num,
            self.p_idx,
            self.p_pat,
            self.f_num,
            self.f_idx,
            self.c_num,
            self.c_idx,
            self.tp_num,
            self.tp_idx,
            self.tp_pat,
            self.tf_num,
            self.tf_idx,
            self.patterns,
        )
        return ExecutorArgs(tables, self.n_q, self.n_k, self.causal)


def _ordered(
    blocks: Tensor, pattern_of: Tensor | None, width: int | None = None, num: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(num, idx, pat): True tiles of each row first (ascending), the list cut to ``width`` (default: the
    longest row, read from the device here; :func:`_widths` reads several in one synchronisation);
    ``num``: the rows' True counts when the caller has them."""
    if num is None:
        num = blocks.sum(dim=-1, dtype=torch.int32)
    if width is None:
        (width,) = _widths(num)
    # (bool as int8, a view when eager; stable, so ties keep their column order)
    idx = torch.argsort(sortable(blocks), dim=-1, descending=True, stable=True)[..., :width]
    pat = None if pattern_of is None else torch.gather(pattern_of, -1, idx).to(torch.int32).contiguous()
    return num.contiguous(), idx.to(torch.int32).contiguous(), pat


def _widths(*nums: Tensor) -> list[int]:
    """max(1, the longest row) of each count tensor, read from the device in one synchronisation."""
    maxes = [n.max() if n.numel() else torch.zeros((), dtype=n.dtype, device=n.device) for n in nums]
    return [max(1, int(m)) for m in torch.stack(maxes).tolist()]


def _t(grid: Tensor) -> Tensor:
    """The grid with its last two dims swapped, contiguous."""
    return grid.transpose(-1, -2).contiguous()


def _causal_patterns(plan: Plan, partial: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_tile_patterns` for plans whose rule is causal: a tile's mask is fixed by its diagonal
    offset ``i * block_q + N_k - N_q - j * block_k`` and whether it is the last tile row / column, so only
    one tile per distinct (offset, last row, last column) is evaluated."""
    bq, bk, dev = plan.block_q, plan.block_k, partial.device
    nqb, nkb = partial.shape[-2:]
    i = torch.arange(nqb, device=dev)[:, None]
    j = torch.arange(nkb, device=dev)[None, :]
    key = (i * bq + (plan.n_k - plan.n_q) - j * bk) * 4 + (i == nqb - 1) * 2 + (j == nkb - 1)
    uniq, inverse = torch.unique(key[partial.any(0).any(0)], return_inverse=True)
    where = partial.any(0).any(0).nonzero()
    first = torch.full((uniq.shape[0],), -1, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inverse, torch.arange(where.shape[0], device=dev), "amin", include_self=False)
    tiles = where[first]  # one representative (i, j) per distinct key
    r = torch.arange(bq, device=dev)[None, :, None]
    c = torch.arange(bk, device=dev)[None, None, :]
    q_idx = tiles[:, 0, None, None] * bq + r
    kv_idx = tiles[:, 1, None, None] * bk + c
    pats = (kv_idx <= q_idx + plan.n_k - plan.n_q) & (q_idx < plan.n_q) & (kv_idx < plan.n_k)
    ids = torch.full((nqb, nkb), -1, dtype=torch.int32, device=dev)  # (int32: the grid is B x H x tiles)
    ids[where[:, 0], where[:, 1]] = inverse.to(torch.int32)
    pat_grid = torch.where(partial, ids.expand_as(partial), -1)
    return pat_grid, pats.to(torch.uint8).contiguous()


def unique_rows(m: Tensor, hashed: bool | None = None) -> tuple[Tensor, Tensor]:
    """The distinct rows of a (T, L) bool matrix, uint8, in order of first occurrence, and each row's
    index among them: ``torch.unique(m.to(torch.uint8), dim=0, return_inverse=True)`` up to the order of
    the distinct rows (see :func:`distinct_words` for ``hashed``)."""
    t, n = m.shape
    if t == 0 or n == 0:  # no rows: none distinct; rows of no columns: one, all alike
        return m[: min(t, 1)].to(torch.uint8), torch.zeros(t, dtype=torch.int64, device=m.device)
    first, inverse = distinct_words(packed_rows(m), hashed)
    return m[first].to(torch.uint8), inverse


def _tile_patterns(plan: Plan, partial: Tensor, moved: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(pattern id per tile, -1 where not partial; the distinct patterns, uint8 (U, block_q, block_k)).

    ``moved``: the full tiles of the key tail made partial (their pattern is every in-matrix pair, as a full
    tile's is for :meth:`Plan.dense_mask`, whatever ``mask_mod`` says there).

    Generic path (token-level ``mask_mod``, no ``pattern_ids``): the mask is evaluated over TILE_CHUNK
    partial tiles at a time (bounding the bool (T, block_q x block_k) tensor) and each tile kept packed in
    64-bit words (one bit per pair: T x block_q x block_k / 8 bytes in all, no more than the patterns
    once an eighth of the tiles are distinct); one :func:`distinct_words` over all the tiles' words then
    numbers the distinct masks by first occurrence in row-major (b, h, i, j) order (so the ids do not
    depend on the chunk, the device or the dedupe route), and the patterns are the distinct rows
    unpacked. Everything stays on the tiles' device: no per-pattern loop, a constant number of host syncs
    whatever the number of tiles or patterns."""
    bq, bk, dev = plan.block_q, plan.block_k, partial.device
    if plan.rule == "causal" and bool(partial.any()):
        return _causal_patterns(plan, partial)
    if plan.pattern_ids is not None:  # a plan from a block rule numbers its distinct tile masks
        keyed = tile_patterns(plan, partial)
        if keyed is not None:  # None: some partial tile has no id (e.g. one moved from the key tail)
            return keyed
    pat_grid = torch.full(partial.shape, -1, dtype=torch.int64, device=dev)
    coords = partial.nonzero()  # (T, 4): b, h, i, j
    if coords.shape[0] == 0:
        return pat_grid, torch.zeros(1, bq, bk, dtype=torch.uint8, device=dev)
    r = torch.arange(bq, device=dev, dtype=torch.int32)
    c = torch.arange(bk, device=dev, dtype=torch.int32)
    words = []
    for t0 in range(0, coords.shape[0], TILE_CHUNK):
        tc = coords[t0 : t0 + TILE_CHUNK].to(torch.int32)
        q_idx = (tc[:, 2, None] * bq + r)[:, :, None]  # (T, bq, 1)
        kv_idx = (tc[:, 3, None] * bk + c)[:, None, :]  # (T, 1, bk)
        m = (q_idx < plan.n_q) & (kv_idx < plan.n_k)
        if plan.mask_mod is not None:
            b, h = tc[:, 0, None, None], tc[:, 1, None, None]
            allowed = plan.mask_mod(b, h, q_idx, kv_idx)
            if moved is not None:
                was_full = moved[tuple(coords[t0 : t0 + TILE_CHUNK].unbind(1))][:, None, None]
                allowed = allowed | was_full
            m = m & allowed
        words.append(packed_rows(m.reshape(m.shape[0], -1)))
    every = torch.cat(words)
    first, inverse = distinct_words(every)
    pat_grid[coords.unbind(1)] = inverse
    return pat_grid, unpacked_rows(every[first], bq * bk).view(-1, bq, bk).contiguous()


def _columns(plan: Plan, visited: Tensor) -> tuple[Tensor, Tensor]:
    """(c_num, c_idx): the plan's columns outside visited tiles, ascending, -1 padded."""
    bp, hp, nqb, _ = plan.shape
    dev = visited.device
    if plan.columns is None:
        return (
            torch.zeros(bp, hp, nqb, dtype=torch.int32, device=dev),
            torch.full((bp, hp, nqb, 1), -1, dtype=torch.int32, device=dev),
        )
    cols = plan.columns.to(device=dev, dtype=torch.int64).expand(bp, hp, nqb, -1)
    valid = (cols >= 0) & (cols < plan.n_k)
    in_tile = torch.gather(visited, -1, (cols.clamp(0, plan.n_k - 1) // plan.block_k))
    keep = valid & ~in_tile
    big = plan.n_k + 1
    ordered = torch.sort(torch.where(keep, cols, big), dim=-1).values
    # duplicates: keep the first of equal neighbours
    dup = torch.zeros_like(keep)
    dup[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    ordered = torch.sort(torch.where(dup, big, ordered), dim=-1).values
    num = (ordered < big).sum(-1, dtype=torch.int32)
    most = int(num.max())
    if most == 0:  # every column fell inside a visited tile: the "no columns" form
        return num.contiguous(), torch.full((bp, hp, nqb, 1), -1, dtype=torch.int32, device=dev)
    idx = torch.where(ordered < big, ordered, -1)[..., :most]
    # tables that hold columns are at least 2 wide (-1 padded): width 1 means "no columns" to the kernels
    idx = torch.nn.functional.pad(idx, (0, max(0, COLUMNS_MIN_WIDTH - idx.shape[-1])), value=-1)
    return num.contiguous(), idx.to(torch.int32).contiguous()


def executor_tables(plan: Plan) -> ExecutorTables:
    """The executor's tables of ``plan`` (built once per plan and kept with it)."""
    memo = plan._memo.get("executor_tables")
    if memo is not None:
        return memo
    full, partial = plan.full, plan.partial
    # a tile both full and partial is full (Plan.dense_mask reads full | partial): visited once, as full
    partial = partial & ~full
    nkb = full.shape[-1]
    moved: Tensor | None = None
    if plan.n_k % plan.block_k:  # a full tile past the key tail becomes partial (the kernel masks it)
        full = full.clone()
        moved = torch.zeros_like(partial)
        moved[..., nkb - 1] = full[..., nkb - 1]
        partial[..., nkb - 1] |= full[..., nkb - 1]
        full[..., nkb - 1] = False
    pat_grid, patterns = _tile_patterns(plan, partial, moved)
    # the four lists' widths in one host read; the key-side lists sort contiguous transposed copies (a
    # sort along a strided dim took 1.4 ms per grid on the H100 at 128K: H=32, 1024 x 1024 tiles)
    nums = [g.sum(dim=d, dtype=torch.int32) for g in (partial, full) for d in (-1, -2)]
    widths = _widths(*nums)
    p_num, p_idx, p_pat = _ordered(partial, pat_grid, widths[0], nums[0])
    f_num, f_idx, _ = _ordered(full, None, widths[2], nums[2])
    tp_num, tp_idx, tp_pat = _ordered(_t(partial), _t(pat_grid), widths[1], nums[1])
    tf_num, tf_idx, _ = _ordered(_t(full), None, widths[3], nums[3])
    c_num, c_idx = _columns(plan, full | partial)
    assert p_pat is not None and tp_pat is not None
    tables = ExecutorTables(
        block_q=plan.block_q,
        block_k=plan.block_k,
        n_q=plan.n_q,
        n_k=plan.n_k,
        causal=bool(plan.causal),
        p_num=p_num,
        p_idx=p_idx,
        p_pat=p_pat,
        f_num=f_num,
        f_idx=f_idx,
        c_num=c_num,
        c_idx=c_idx,
        tp_num=tp_num,
        tp_idx=tp_idx,
        tp_pat=tp_pat,
        tf_num=tf_num,
        tf_idx=tf_idx,
        patterns=patterns,
    )
    if not torch.compiler.is_compiling():
        plan._memo["executor_tables"] = tables
    return tables


# -- varlen: packed sequences as one block-diagonal plan ------------------------------------------------


@dataclass(frozen=True)
class _Local:
    """One sequence's plan in its own coordinates: tiles (Hp, NQB_s, NKB_s) and its token rule
    (``kind``: 0 = partial tiles count whole, 1 = the bottom-right causal rule, 2 = ``mask_mod``)."""

    full: Tensor
    partial: Tensor
    kind: int
    mask_mod: Any


def _dense_local(n_q: int, n_k: int, causal: bool, block: int, device: torch.device) -> _Local:
    """Dense attention of one sequence in ``block`` tiles (causal: bottom-right aligned)."""
    nqb, nkb = -(-n_q // block), -(-n_k // block)
    if not causal:
        return _Local(torch.ones(1, nqb, nkb, dtype=torch.bool, device=device),
                      torch.zeros(1, nqb, nkb, dtype=torch.bool, device=device), 0, None)  # fmt: skip
    off = n_k - n_q
    iq, ik = torch.arange(nqb, device=device), torch.arange(nkb, device=device)
    q_first, q_last = iq * block + off, torch.clamp((iq + 1) * block, max=n_q) - 1 + off
    k_first, k_last = ik * block, torch.clamp((ik + 1) * block, max=n_k) - 1
    allowed = k_first[None, :] <= q_last[:, None]
    whole = k_last[None, :] <= q_first[:, None]
    return _Local((allowed & whole)[None], (allowed & ~whole)[None], 1, None)


def _local_of(plan: Plan, n_q: int, n_k: int, block: int, index: int, device: torch.device) -> _Local:
    """A sequence's plan after checking it against the sequence (batch 1, square ``block`` tiles, no columns)."""
    if (plan.n_q, plan.n_k) != (n_q, n_k):
        raise ValueError(f"sequence {index}: plan_fn gave a plan for ({plan.n_q}, {plan.n_k}) tokens; the "
                         f"sequence has N_q = {n_q}, N_k = {n_k}")  # fmt: skip
    if (plan.block_q, plan.block_k) != (block, block):
        raise ValueError(f"sequence {index}: the plan's tiles are {plan.block_q} x {plan.block_k}; varlen "
                         f"needs every sequence in {block} x {block} tiles")  # fmt: skip
    if plan.full.shape[0] != 1:
        raise ValueError(
            f"sequence {index}: the plan has batch {plan.full.shape[0]}; a sequence's plan has 1"
        )
    if plan.columns is not None:
        raise ValueError(f"sequence {index}: the plan has token columns (e.g. vertical_slash); varlen takes "
                         "tile plans only")  # fmt: skip
    kind = 0 if plan.mask_mod is None else 1 if plan.rule == "causal" else 2
    return _Local(plan.full[0].to(device), plan.partial[0].to(device), kind, plan.mask_mod)


def varlen_plan(
    cu_q: list[int],
    cu_k: list[int],
    plans: list[Plan | None],
    causal: bool,
    block: int,
    device: torch.device | str,
) -> Plan:
    """One plan over packed sequences: sequence ``s`` holds queries ``[cu_q[s], cu_q[s+1])`` and keys
    ``[cu_k[s], cu_k[s+1])``; its pairs are those of ``plans[s]`` (a plan over the sequence alone, in its
    own coordinates; None: dense, causal bottom-right aligned within the sequence when ``causal``). No
    pair crosses a sequence boundary.

    The packed plan (1, Hp, ceil(T_q / block), ceil(T_k / block)) visits every packed tile that a
    sequence's visited tile touches. A packed tile is full when its rows and columns lie in one sequence
    and every sequence tile it overlaps is full; otherwise it is partial, and its token mask (``mask_mod``)
    checks the segment ids of both sides, then the sequence plan's own tile and rule at local positions,
    so tiles straddling a boundary or a diagonal run exactly. Its ``causal`` flag is False (causality
    lives in the sequences' rules). Hp is 1 or the sequences' common head count.
    """
    dev = torch.device(device)
    n_seq = len(cu_q) - 1
    tq, tk = cu_q[-1], cu_k[-1]
    nqb, nkb = -(-tq // block), -(-tk // block)
    locals_: list[_Local | None] = []
    for s in range(n_seq):
        n_q, n_k = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        if n_q == 0 or n_k == 0:
            locals_.append(None)  # no pair (rows without keys give zeros)
        elif plans[s] is None:
            locals_.append(_dense_local(n_q, n_k, causal, block, dev))
        else:
            locals_.append(_local_of(plans[s], n_q, n_k, block, s, dev))  # type: ignore[arg-type]
    hps = {loc.full.shape[0] for loc in locals_ if loc is not None} - {1}
    if len(hps) > 1:
        raise ValueError(
            f"the sequences' plans have head counts {sorted(hps | {1})}; they must be 1 or one H"
        )
    hp = hps.pop() if hps else 1
    ovl = torch.zeros(hp, nqb * nkb, dtype=torch.int32, device=dev)  # sequence tiles overlapping a tile
    fulls = torch.zeros_like(ovl)  # ... of which full
    vis = torch.zeros_like(ovl)  # ... of which visited
    mq = max([1] + [(loc.full.shape[1]) for loc in locals_ if loc is not None])
    mk = max([1] + [(loc.full.shape[2]) for loc in locals_ if loc is not None])
    stack_full = torch.zeros(n_seq, hp, mq, mk, dtype=torch.bool, device=dev)
    stack_part = torch.zeros_like(stack_full)
    kinds = torch.tensor([0 if loc is None else loc.kind for loc in locals_], dtype=torch.int64, device=dev)
    for s, loc in enumerate(locals_):
        if loc is None:
            continue
        lq, lk = loc.full.shape[1:]
        stack_full[s, :, :lq, :lk] = loc.full
        stack_part[s, :, :lq, :lk] = loc.partial
    # every sequence tile touches at most 2 x 2 packed tiles: count, per packed tile, the sequence tiles
    # overlapping it, and of those the full and the visited ones (all sequences at once)
    n_qs = torch.tensor(cu_q[1:], device=dev) - torch.tensor(cu_q[:-1], device=dev)
    n_ks = torch.tensor(cu_k[1:], device=dev) - torch.tensor(cu_k[:-1], device=dev)
    present = torch.tensor([loc is not None for loc in locals_], device=dev)
    iq, ik = torch.arange(mq, device=dev)[None], torch.arange(mk, device=dev)[None]
    q0, k0 = torch.tensor(cu_q[:-1], device=dev)[:, None], torch.tensor(cu_k[:-1], device=dev)[:, None]
    rows = (q0 + iq * block) // block, (q0 + torch.minimum((iq + 1) * block, n_qs[:, None]) - 1) // block
    cols = (k0 + ik * block) // block, (k0 + torch.minimum((ik + 1) * block, n_ks[:, None]) - 1) // block
    valid = (present[:, None, None] & (iq < -(-n_qs // block)[:, None])[:, :, None]
             & (ik < -(-n_ks // block)[:, None])[:, None, :])  # fmt: skip
    f = stack_full.transpose(0, 1).int()  # (Hp, S, MQ, MK)
    v = (stack_full | stack_part).transpose(0, 1).int()
    seen: list[Tensor] = []
    for a in (0, 1):
        for c in (0, 1):
            lin = rows[a][:, :, None] * nkb + cols[c][:, None, :]  # (S, MQ, MK)
            # a packed tile counted once per sequence tile, even where its two row (column) ends coincide
            fresh = valid.clone()
            for prev in seen:
                fresh &= lin != prev
            seen.append(lin)
            idx = lin[fresh]
            ovl.index_add_(1, idx, torch.ones(hp, idx.numel(), dtype=torch.int32, device=dev))
            fulls.index_add_(1, idx, f[:, fresh])
            vis.index_add_(1, idx, v[:, fresh])
    seg_q = torch.repeat_interleave(torch.arange(n_seq, device=dev),
                                    torch.tensor(cu_q[1:], device=dev) - torch.tensor(cu_q[:-1], device=dev))  # fmt: skip
    seg_k = torch.repeat_interleave(torch.arange(n_seq, device=dev),
                                    torch.tensor(cu_k[1:], device=dev) - torch.tensor(cu_k[:-1], device=dev))  # fmt: skip

    # a packed tile lies in one sequence when its first and last rows (columns) share a segment
    def spans(seg: Tensor, n: int, nb: int) -> Tensor:
        first = seg[torch.arange(nb, device=dev) * block]
        last = seg[torch.clamp((torch.arange(nb, device=dev) + 1) * block, max=n) - 1]
        return torch.where(first == last, first, -1)

    one_q, one_k = spans(seg_q, tq, nqb), spans(seg_k, tk, nkb)
    inside = (one_q[:, None] == one_k[None, :]) & (one_q[:, None] >= 0)
    full = (inside.view(1, -1) & (ovl > 0) & (fulls == ovl)).view(1, hp, nqb, nkb)
    partial = (vis > 0).view(1, hp, nqb, nkb) & ~full
    if tk % block:  # a full tile past the key tail is partial for the executor: make it so here, with an id
        partial[..., -1] |= full[..., -1]
        full[..., -1] = False
    cu_q_t = torch.tensor(cu_q, device=dev)
    cu_k_t = torch.tensor(cu_k, device=dev)
    ids = _varlen_pattern_ids(partial, one_q, one_k, stack_full, stack_part, kinds, cu_q_t, cu_k_t, block)
    offsets = (cu_k_t[1:] - cu_k_t[:-1]) - (cu_q_t[1:] - cu_q_t[:-1])
    custom = [(s, loc) for s, loc in enumerate(locals_) if loc is not None and loc.kind == 2]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qi = q_idx.long().clamp(0, max(tq - 1, 0))
        ki = kv_idx.long().clamp(0, max(tk - 1, 0))
        s = seg_q[qi]
        same = (seg_k[ki] == s) & (q_idx < tq) & (kv_idx < tk)
        ql, kl = qi - cu_q_t[s], ki - cu_k_t[s]
        qt, kt = (ql // block).clamp(0, mq - 1), (kl // block).clamp(0, mk - 1)
        hh = h.long() if hp > 1 else torch.zeros_like(h, dtype=torch.long)
        in_full = stack_full[s, hh, qt, kt]
        in_part = stack_part[s, hh, qt, kt]
        kind = kinds[s]
        rule = (kind == 0) | ((kind == 1) & (kl <= ql + offsets[s]))
        for si, loc in custom:  # sequences with their own token rule, at their local positions (clamped
            # into the sequence where another sequence's element is evaluated: `same` drops those)
            lq = ql.clamp(0, cu_q[si + 1] - cu_q[si] - 1)
            lk = kl.clamp(0, cu_k[si + 1] - cu_k[si] - 1)
            lh = hh if loc.full.shape[0] > 1 else torch.zeros_like(hh)
            rule = torch.where(s == si, loc.mask_mod(torch.zeros_like(lh), lh, lq, lk), rule)
        return same & (in_full | (in_part & rule))

    return Plan(tq, tk, False, block, block, full, partial, mask_mod, kind="dynamic", pattern_ids=ids)


def _varlen_pattern_ids(
    partial: Tensor,
    one_q: Tensor,
    one_k: Tensor,
    stack_full: Tensor,
    stack_part: Tensor,
    kinds: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    block: int,
) -> Tensor:
    """int32 (1, Hp, NQB, NKB) pattern ids of a packed plan's partial tiles (-1 elsewhere), so that the
    executor's tables evaluate one tile per id (:func:`attnlab.plans.blocks.tile_patterns`).

    A tile whose rows (or columns) lie in one sequence ``s`` with a whole or causal rule holds pairs of
    ``s`` only, and its token mask is fixed by: the band of its columns (rows) inside ``s`` (``c0 <= c <
    c1``, ``r0 <= r < r1``), the split of its rows (columns) between two sequence tiles (``cu_q[s] %
    block``, ``cu_k[s] % block``), the status (none / full / partial) of the up to four sequence tiles
    it overlaps, the rule, and its causal diagonal offset ``c - r <= (I - J) block + cu_k[s+1] -
    cu_q[s+1]`` (clipped to [-block, block], beyond which the rule is constant): equal keys give equal
    masks. Every other partial tile (rows and columns both straddling a boundary, or a sequence with its
    own token rule) gets an id of its own."""
    dev = partial.device
    _, hp, nqb, nkb = partial.shape
    n_seq, _, mq, mk = stack_full.shape
    i = torch.arange(nqb, device=dev)[:, None]
    j = torch.arange(nkb, device=dev)[None, :]
    rows_one = (one_q >= 0)[:, None].expand(nqb, nkb)
    s = torch.where(rows_one, one_q[:, None].expand(nqb, nkb), one_k[None, :].expand(nqb, nkb)).clamp_min(0)
    keyed = (rows_one | (one_k >= 0)[None, :]) & (kinds[s] <= 1)
    lq = torch.div(cu_q[1:] - cu_q[:-1] + block - 1, block, rounding_mode="floor")[s]  # the sequence's tiles
    lk = torch.div(cu_k[1:] - cu_k[:-1] + block - 1, block, rounding_mode="floor")[s]
    r0, r1 = (cu_q[s] - i * block).clamp(0, block), (cu_q[s + 1] - i * block).clamp(0, block)
    c0, c1 = (cu_k[s] - j * block).clamp(0, block), (cu_k[s + 1] - j * block).clamp(0, block)
    rq, rk = cu_q[s] % block, cu_k[s] % block
    a = torch.div(i * block - cu_q[s] + rq, block, rounding_mode="floor")  # the lower rows' sequence tile
    b = torch.div(j * block - cu_k[s] + rk, block, rounding_mode="floor")
    hh = torch.arange(hp, device=dev)[:, None, None]
    status = (stack_full.int() + 2 * stack_part.int()).view(n_seq, hp, mq, mk)

    def st(aa: Tensor, bb: Tensor) -> Tensor:
        """The status of sequence tile (aa, bb) of s; 0 outside the sequence's tiles."""
        got = status[s[None], hh, aa.clamp(0, mq - 1)[None], bb.clamp(0, mk - 1)[None]]
        ok = (aa >= 0) & (aa < lq) & (bb >= 0) & (bb < lk)
        return torch.where(ok[None], got, 0)

    top, left = rq > 0, rk > 0  # rows (columns) before the split exist
    quad = (torch.where((top & left)[None], st(a - 1, b - 1), 0) * 27 + torch.where(top[None], st(a - 1, b), 0) * 9
            + torch.where(left[None], st(a, b - 1), 0) * 3 + st(a, b))  # fmt: skip
    delta = ((i - j) * block + cu_k[s + 1] - cu_q[s + 1]).clamp(-block, block)
    fields = [kinds[s], delta, rq, rk, r0, r1, c0, c1]
    key = torch.stack(
        [f.expand(nqb, nkb)[None].expand(hp, -1, -1) for f in fields] + [quad], -1
    )  # (Hp, ., ., 9)
    own = -1 - torch.arange(hp * nqb * nkb, device=dev).view(hp, nqb, nkb)  # unique, below every key
    key = torch.where(keyed[None, :, :, None], key, own[..., None])[None]
    ids = torch.full(partial.shape, -1, dtype=torch.int32, device=dev)
    if bool(partial.any()):
        _, inverse = torch.unique(key[partial], dim=0, return_inverse=True)
        ids[partial] = inverse.to(torch.int32)
    return ids
