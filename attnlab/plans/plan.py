"""The :class:`Plan` value and what is derived from it (density, recall, dense mask, BlockMask, tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.masks import MaskMod, check_dense_size, dense_pairs


def dense_block_count(n_q: int, n_k: int, causal: bool, block_q: int, block_k: int) -> int:
    """Tiles of the (N_q, N_k) score matrix that dense attention touches: every tile, or when causal
    (bottom-right aligned, query ``i`` at position ``i + N_k - N_q``) the tiles holding some ``j <= p``."""
    nqb, nkb = -(-n_q // block_q), -(-n_k // block_k)
    if not causal:
        return nqb * nkb
    offset, total = n_k - n_q, 0
    for i in range(nqb):
        p_max = min((i + 1) * block_q, n_q) - 1 + offset  # the block's last query position
        total += 0 if p_max < 0 else min(nkb, p_max // block_k + 1)
    return total


@dataclass(frozen=True, eq=False)
class Plan:
    """Which (query, key) pairs one call computes, at block granularity plus a token rule.

    - ``full`` and ``partial``: bool (Bp, Hp, NQB, NKB), Bp in {1, B} and Hp in {1, H} (1 broadcasts):
      the (``block_q`` x ``block_k``) tiles to visit. In a full tile every pair inside the matrix is
      computed; in a partial tile, the pairs where ``mask_mod(b, h, q_idx, kv_idx)`` is True (the
      FlexAttention convention; positions are absolute token indices).
    - ``columns``: optional int32 (Bp, Hp, NQB, C): key tokens every query of a block also visits
      (MInference's vertical lines), -1 padding; not used by static plans. A column counts only outside
      the tiles its query block visits (inside one, the tile's own rule decides), and when causal only
      where ``j <= p``.
    - ``allowed_count``: the exact number of computed pairs per (Bp, Hp) when the producer counted them
      (static plans), else None.
    - ``kind``: "static" (from a mask and shapes; cacheable) or "dynamic" (estimated from q, k).
    - ``rule``: "causal" when ``mask_mod`` is the bottom-right causal rule ``kv_idx <= q_idx + N_k - N_q``
      (then a partial tile's token mask depends only on its diagonal offset and the matrix edges, which
      lets the executor's tables be built without evaluating every tile), else None.
    - ``pattern_ids``: optional int32 (Bp, Hp, NQB, NKB), -1 outside partial tiles: partial tiles with
      equal ids have the same token mask (``mask_mod`` over the tile, pairs past the matrix's edges
      excluded), so one tile per id tells them all (see :func:`attnlab.plans.blocks.tile_patterns`).
      Ids compare across the whole tensor (every (Bp, Hp)): a producer stacking per-head plans offsets
      each head's ids or leaves None. Set by the block-rule builder of static plans; None when unknown.

    The token mask of the plan is ``full | (partial & mask_mod) | column hits outside visited tiles``
    (partial tiles also stop at the matrix's edges); every quantity below is
    derived from it, so density, recall, the dense mask and the kernels' tables cannot disagree.
    """

    n_q: int
    n_k: int
    causal: bool
    block_q: int
    block_k: int
    full: Tensor
    partial: Tensor
    mask_mod: MaskMod | None
    kind: str = "static"
    columns: Tensor | None = None
    allowed_count: Tensor | None = None
    rule: str | None = None
    pattern_ids: Tensor | None = None
    #: derived values built on first use (the BlockMask, the tables)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Checks the shapes (only shapes: no device read, nothing that depends on the values, so a Plan
        builds inside a traced graph): ``full`` and ``partial`` of one (Bp, Hp, NQB, NKB) shape whose tile
        dims are (ceil(N_q / block_q), ceil(N_k / block_k)); ``columns`` (Bp or 1, Hp or 1, NQB, C) of an
        integer dtype. (Bp and Hp against the call's B and H are the executor's check: a plan does not
        know them.)"""
        full, partial = self.full, self.partial
        if full.dim() != 4 or partial.dim() != 4:
            raise ValueError(
                f"a plan's full and partial tile grids are (Bp, Hp, NQB, NKB); got full {tuple(full.shape)}, "
                f"partial {tuple(partial.shape)}"
            )
        if full.shape != partial.shape:
            raise ValueError(
                f"a plan's full {tuple(full.shape)} and partial {tuple(partial.shape)} tile grids differ in "
                "shape: give both the same (Bp, Hp, NQB, NKB) (expand the broadcast one)"
            )
        tiles = (-(-self.n_q // self.block_q), -(-self.n_k // self.block_k))
        if tuple(full.shape[2:]) != tiles:
            raise ValueError(
                f"a plan's tile grids have {tuple(full.shape[2:])} tiles; N_q = {self.n_q}, N_k = {self.n_k} "
                f"in tiles of {self.block_q} x {self.block_k} need {tiles}"
            )
        cols = self.columns
        if cols is not None:
            bp, hp, nqb = full.shape[:3]
            ok = (
                cols.dim() == 4
                and cols.shape[0] in (1, bp)
                and cols.shape[1] in (1, hp)
                and cols.shape[2] == nqb
            )
            if not ok:
                raise ValueError(
                    f"a plan's columns {tuple(cols.shape)} do not fit its tile grids {tuple(full.shape)}: "
                    f"expected ({bp}, {hp}, {nqb}, C) (its first two dims may be 1)"
                )
            if cols.dtype.is_floating_point or cols.dtype.is_complex or cols.dtype == torch.bool:
                raise ValueError(f"a plan's columns are key indices of an integer dtype; got {cols.dtype}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bp, Hp, NQB, NKB)."""
        b, h, nqb, nkb = self.full.shape
        return b, h, nqb, nkb

    @property
    def computed_blocks(self) -> int:
        """Tiles visited, summed over the plan's (Bp, Hp)."""
        return int(self.full.sum()) + int(self.partial.sum())

    @property
    def density(self) -> float:
        """Share of the dense pattern's (query, key) pairs computed (token level), over (Bp, Hp)."""
        b, h = self.full.shape[:2]
        pairs = dense_pairs(self.n_q, self.n_k, self.causal) * b * h
        if self.allowed_count is not None:
            return float(self.allowed_count.sum()) / max(1, pairs)
        return float(self.dense_mask().sum()) / max(1, pairs)

    @property
    def block_density(self) -> float:
        """Share of the dense pattern's tiles visited (what a block-sparse kernel's time follows)."""
        b, h = self.full.shape[:2]
        dense = dense_block_count(self.n_q, self.n_k, self.causal, self.block_q, self.block_k) * b * h
        return self.computed_blocks / max(1, dense)

    def dense_mask(self) -> Tensor:
        """The plan's token mask, bool (Bp, Hp, N_q, N_k); refused above the dense size limit."""
        bp, hp = self.shape[:2]
        check_dense_size(bp * hp * self.n_q * self.n_k, "a plan's dense mask", "the plan's block form")
        dev = self.full.device
        rows = torch.arange(self.n_q, device=dev) // self.block_q
        cols = torch.arange(self.n_k, device=dev) // self.block_k
        full = self.full[:, :, rows][:, :, :, cols]
        partial = self.partial[:, :, rows][:, :, :, cols]
        if self.mask_mod is not None:
            b = torch.arange(bp, device=dev, dtype=torch.int32)[:, None, None, None]
            h = torch.arange(hp, device=dev, dtype=torch.int32)[None, :, None, None]
            q_idx = torch.arange(self.n_q, device=dev, dtype=torch.int32)[None, None, :, None]
            kv_idx = torch.arange(self.n_k, device=dev, dtype=torch.int32)[None, None, None, :]
            partial = partial & self.mask_mod(b, h, q_idx, kv_idx)
        mask = full | partial
        if self.columns is not None:
            # one spare key column takes the -1 pads (scattering their False onto key 0 would drop a real
            # column 0 whenever a pad came after it)
            hit = torch.zeros(*mask.shape[:3], self.n_k + 1, dtype=torch.bool, device=dev)
            cols_tok = self.columns[:, :, rows].long()  # (Bp, Hp, N_q, C)
            hit.scatter_(-1, torch.where(cols_tok >= 0, cols_tok, self.n_k), True)
            hit = hit[..., : self.n_k]
            visited = (self.full | self.partial)[:, :, rows][:, :, :, cols]
            hit &= ~visited
            if self.causal:
                pos = torch.arange(self.n_q, device=dev)[:, None] + (self.n_k - self.n_q)
                hit &= torch.arange(self.n_k, device=dev)[None, :] <= pos
            mask = mask | hit
        return mask

    def recall(self, probs: Tensor) -> Tensor:
        """Attention-mass recall: the share of dense attention mass ``probs`` (B, H, N_q, N_k; rows sum
        to 1 or 0) on the pairs the plan computes, averaged over query rows with any mass -> (B, H)."""
        kept = (probs * self.dense_mask()).sum(-1)
        total = probs.sum(-1)
        rows = (total > 0).sum(-1).clamp_min(1)
        return torch.where(total > 0, kept / total.clamp_min(1e-30), 0.0).sum(-1) / rows

    def tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(partial_num, partial_idx, full_num, full_idx), int32: per (Bp, Hp, query block) the number of
        partial / full key blocks and their indices, the ones to visit first (FlexAttention's layout)."""
        memo = self._memo.get("tables")
        if memo is None:
            memo = (*_ordered(self.partial), *_ordered(self.full))
            if not torch.compiler.is_compiling():
                self._memo["tables"] = memo
        return memo

    def block_mask(self) -> Any:
        """The FlexAttention BlockMask of this plan (built once, then kept with the plan); its query-side
        tables (for the backward) come from the transposed tile grids, as the key-side ones do."""
        bm = self._memo.get("block_mask")
        if bm is None:
            if self.columns is not None:
                raise ValueError("a plan with token columns has no BlockMask form; use an executor")
            from attnlab.kernels.flex import block_mask_from_tables

            # (contiguous transposed copies: a sort along a strided dim is several times slower on a GPU)
            q_side = (*_ordered(self.partial.mT.contiguous()), *_ordered(self.full.mT.contiguous()))
            bm = block_mask_from_tables(
                *self.tables(), self.mask_mod, self.n_q, self.n_k, (self.block_q, self.block_k), q_side
            )
            if not torch.compiler.is_compiling():
                self._memo["block_mask"] = bm
        return bm


def sortable(blocks: Tensor) -> Tensor:
    """A bool tile mask as int8 for ``argsort``: a view (no copy) when eager; a conversion under
    ``torch.compile``, whose inductor cannot lower a bitcast of bool (``aten.view.dtype``: "torch.bool is not
    supported by torch.iinfo", seen on CUDA with torch 2.11)."""
    return blocks.to(torch.int8) if torch.compiler.is_compiling() else blocks.view(torch.int8)


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(num, indices) of True tiles per query-block row, True columns first, as FlexAttention wants."""
    num = blocks.sum(dim=-1, dtype=torch.int32).contiguous()
    idx = torch.argsort(sortable(blocks), dim=-1, descending=True, stable=True)
    return num, idx.to(torch.int32, memory_format=torch.contiguous_format)
