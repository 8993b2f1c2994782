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

import torch
from torch import Tensor

from attnlab.plans.blocks import tile_patterns
from attnlab.plans.plan import Plan

#: Partial tiles whose masks are evaluated at once (memory: this many x block_q x block_k bytes).
TILE_CHUNK = 2048


@dataclass(frozen=True, eq=False)
class ExecutorTables:
    """The executor's view of a plan. Every table is int32 with a leading (Bp, Hp) pair (1 broadcasts)."""

    block_q: int
    block_k: int
    n_q: int
    n_k: int
    #: forward: per (Bp, Hp, NQB)
    p_num: Tensor
    p_idx: Tensor  # (Bp, Hp, NQB, max partial)
    p_pat: Tensor  # pattern id of each listed partial tile
    f_num: Tensor
    f_idx: Tensor  # (Bp, Hp, NQB, max full)
    c_num: Tensor
    c_idx: Tensor  # (Bp, Hp, NQB, C) key tokens, ascending, -1 padded (C >= 1)
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
        return self.c_idx.shape[-1] > 1 or bool((self.c_num > 0).any())

    def as_args(self) -> tuple[Tensor, ...]:
        """The tables in the order the executor's custom ops take them."""
        return (
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


def _ordered(blocks: Tensor, pattern_of: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(num, idx, pat): True tiles of each row first (ascending), the list cut to the longest row."""
    num = blocks.sum(dim=-1, dtype=torch.int32)
    width = max(1, int(num.max()) if num.numel() else 1)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
    pat = None if pattern_of is None else torch.gather(pattern_of, -1, idx).to(torch.int32).contiguous()
    return num.contiguous(), idx.to(torch.int32).contiguous(), pat


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
    ids = torch.full((nqb, nkb), -1, dtype=torch.int64, device=dev)
    ids[where[:, 0], where[:, 1]] = inverse
    pat_grid = torch.where(partial, ids.expand_as(partial), -1)
    return pat_grid, pats.to(torch.uint8).contiguous()


def _tile_patterns(plan: Plan, partial: Tensor) -> tuple[Tensor, Tensor]:
    """(pattern id per tile, -1 where not partial; the distinct patterns, uint8 (U, block_q, block_k))."""
    bq, bk, dev = plan.block_q, plan.block_k, partial.device
    if plan.rule == "causal" and bool(partial.any()):
        return _causal_patterns(plan, partial)
    if plan.pattern_ids is not None:  # a plan from a block rule numbers its distinct tile masks
        keyed = tile_patterns(plan, partial, TILE_CHUNK)
        if keyed is not None:  # None: some partial tile has no id (e.g. one moved from the key tail)
            return keyed
    pat_grid = torch.full(partial.shape, -1, dtype=torch.int64, device=dev)
    coords = partial.nonzero()  # (T, 4): b, h, i, j
    r = torch.arange(bq, device=dev, dtype=torch.int32)
    c = torch.arange(bk, device=dev, dtype=torch.int32)
    seen: dict[bytes, int] = {}
    distinct: list[Tensor] = []
    for t0 in range(0, coords.shape[0], TILE_CHUNK):
        tc = coords[t0 : t0 + TILE_CHUNK].to(torch.int32)
        q_idx = (tc[:, 2, None] * bq + r)[:, :, None]  # (T, bq, 1)
        kv_idx = (tc[:, 3, None] * bk + c)[:, None, :]  # (T, 1, bk)
        m = (q_idx < plan.n_q) & (kv_idx < plan.n_k)
        if plan.mask_mod is not None:
            b, h = tc[:, 0, None, None], tc[:, 1, None, None]
            m = m & plan.mask_mod(b, h, q_idx, kv_idx)
        m = m.to(torch.uint8)
        uniq, inverse = torch.unique(m.reshape(m.shape[0], -1), dim=0, return_inverse=True)
        ids = torch.empty(uniq.shape[0], dtype=torch.int64)
        for u in range(uniq.shape[0]):
            key = uniq[u].cpu().numpy().tobytes()
            if key not in seen:
                seen[key] = len(distinct)
                distinct.append(uniq[u].view(bq, bk))
            ids[u] = seen[key]
        chunk = coords[t0 : t0 + TILE_CHUNK]
        pat_grid[chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]] = ids.to(dev)[inverse]
    patterns = torch.stack(distinct) if distinct else torch.zeros(1, bq, bk, dtype=torch.uint8, device=dev)
    return pat_grid, patterns.contiguous()


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
    width = max(1, int(num.max()))
    idx = torch.where(ordered < big, ordered, -1)[..., :width]
    return num.contiguous(), idx.to(torch.int32).contiguous()


def executor_tables(plan: Plan) -> ExecutorTables:
    """The executor's tables of ``plan`` (built once per plan and kept with it)."""
    memo = plan._memo.get("executor_tables")
    if memo is not None:
        return memo
    full, partial = plan.full.clone(), plan.partial.clone()
    nkb = full.shape[-1]
    if plan.n_k % plan.block_k:  # a full tile past the key tail becomes partial (the kernel masks it)
        partial[..., nkb - 1] |= full[..., nkb - 1]
        full[..., nkb - 1] = False
    pat_grid, patterns = _tile_patterns(plan, partial)
    p_num, p_idx, p_pat = _ordered(partial, pat_grid)
    f_num, f_idx, _ = _ordered(full, None)
    tp_num, tp_idx, tp_pat = _ordered(partial.transpose(-1, -2), pat_grid.transpose(-1, -2))
    tf_num, tf_idx, _ = _ordered(full.transpose(-1, -2), None)
    c_num, c_idx = _columns(plan, full | partial)
    assert p_pat is not None and tp_pat is not None
    tables = ExecutorTables(
        block_q=plan.block_q,
        block_k=plan.block_k,
        n_q=plan.n_q,
        n_k=plan.n_k,
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
