"""``multi_axis``: MaxViT's multi-axis attention on a 2-D grid, block (local) and grid (dilated global).

MaxViT runs two attentions one after the other: *block* attention inside non-overlapping ``P x P``
windows, and *grid* attention among the tokens of a ``G x G`` grid spread over the whole image (the
tokens whose coordinates agree modulo the grid step ``ceil(L / G)`` per axis). As one static pattern,
this method is their union: a token attends to its window and to its grid group::

    shape=(4, 4), block=2, grid=2: the keys of query (0, 0) and of query (2, 3) (x = attends)
    (0,0): x x x .     (2,3): . x . x      block: the 2 x 2 window holding the query
           x x . .            . . . .      grid:  step ceil(4 / 2) = 2 per axis, i.e. the
           x . x .            . x x x             tokens at the query's coordinates mod 2
           . . . .            . . x x

Windows at the far edge of an axis that ``block`` does not divide are smaller (MaxViT pads instead).
The grid is in raster order (last axis fastest); ``shape=None`` means a 1 x N grid (block and grid
then act along the sequence, each capped at N). The call's ``causal=True`` further keeps only keys
``j <= i`` in raster order. Self-attention only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.catalog.static import EXECUTOR_FIRST
from attnlab.catalog.structured import _grid
from attnlab.core import MethodSpec
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import SELF_PATTERNS
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class MultiAxisParams(Params):
    """``shape``: the (height, width) grid, product N (default None: 1 x N); ``block``: window side P
    (int or (P_h, P_w), >= 1, default 8); ``grid``: grid side G (int or (G_h, G_w), >= 1, default 8).
    With an explicit shape, P and G must fit in each axis."""

    method = "multi_axis"
    shape: tuple[int, int] | None = None
    block: int | tuple[int, int] = 8
    grid: int | tuple[int, int] = 8

    def __post_init__(self) -> None:
        for name in ("shape", "block", "grid"):
            object.__setattr__(self, name, _grid.as_tuple(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        s = self.shape
        ok = s is None or (
            isinstance(s, tuple)
            and len(s) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in s)
        )
        if not ok:
            raise self._fail("shape", s, "None (a 1 x N grid) or a (height, width) tuple of positive ints")
        block = _grid.per_axis(self.method, "block", self.block, 2)
        grid = _grid.per_axis(self.method, "grid", self.grid, 2)
        if self.shape is not None:
            _grid.check_fits(self.method, "block", block, self.shape)
            _grid.check_fits(self.method, "grid", grid, self.shape)

    def resolved(self, n: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(shape, block, grid step) of a sequence of ``n`` tokens; block and grid capped at each axis."""
        shape = self.shape if self.shape is not None else (1, n)
        block = _grid.per_axis(self.method, "block", self.block, 2)
        grid = _grid.per_axis(self.method, "grid", self.grid, 2)
        blocks = (min(block[0], shape[0]), min(block[1], shape[1]))
        steps = (-(-shape[0] // min(grid[0], shape[0])), -(-shape[1] // min(grid[1], shape[1])))
        return shape, blocks, steps

    def check_lengths(self, n_q: int, n_k: int) -> None:
        _grid.grid_of(self.method, self.shape, n_q, n_k)


def mask(p: MultiAxisParams, ctx: MaskContext) -> MaskMod:
    _grid.grid_of(p.method, p.shape, ctx.n_q, ctx.n_k)
    (_, width), (bh, bw), (sh, sw) = p.resolved(ctx.n_q)
    w, bh_, bw_, sh_, sw_ = (ctx.const(x) for x in (width, bh, bw, sh, sw))

    def multi_axis(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qy, qx, ky, kx = q_idx // w, q_idx % w, kv_idx // w, kv_idx % w
        window = (qy // bh_ == ky // bh_) & (qx // bw_ == kx // bw_)
        grid = (qy % sh_ == ky % sh_) & (qx % sw_ == kx % sw_)
        return ctx.causal_ok(ctx.distance(q_idx, kv_idx)) & (window | grid)

    return multi_axis


def index_mask(params: MultiAxisParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N, N) bool mask from explicit window and grid-group membership lists, independently of
    :func:`mask`."""
    _grid.grid_of(params.method, params.shape, n_q, n_k)
    (height, width), (bh, bw), (sh, sw) = params.resolved(n_q)
    coords = [(y, x) for y in range(height) for x in range(width)]  # raster order
    windows: dict[tuple[int, int], list[int]] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for t, (y, x) in enumerate(coords):
        windows.setdefault((y // bh, x // bw), []).append(t)
        groups.setdefault((y % sh, x % sw), []).append(t)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for t, (y, x) in enumerate(coords):
        out[t, windows[(y // bh, x // bw)]] = True
        out[t, groups[(y % sh, x % sw)]] = True
    if causal:
        out &= torch.ones(n_q, n_k, dtype=torch.bool).tril()
    return out


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: MultiAxisParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention of each grid token over the union of its ``block`` window (same
    ``(y // P_h, x // P_w)``) and its grid group (same ``(y mod ceil(H / G_h), x mod ceil(W / G_w))``),
    raster order, ``j <= i`` when causal. Needs ``N_q == N_k == H * W``."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, Any]]:
    side = 2 ** (math.isqrt(n).bit_length() - 1)
    if n % side:
        return [{"block": 64, "grid": 64}]
    return [
        {"shape": (n // side, side), "block": max(1, min(8, side // 4)), "grid": max(1, min(8, side // 4))}
    ]


SPEC = MethodSpec(
    name="multi_axis",
    family="static",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022)",
    summary="2-D block windows plus a dilated global grid (MaxViT block + grid attention, as one mask)",
    param_class=MultiAxisParams,
    reference=reference,
    # the executor first: 2.4-3.3x faster than FlexAttention at 16K on the H100 (shape 128 x 128, block
    # and grid 8), forward and forward + backward, causal and not (3fd780a, h100-2026-11-24/structured/)
    backends=EXECUTOR_FIRST,
    patterns=SELF_PATTERNS,
    mask=mask,
    index_mask=index_mask,
    # 1 x N only: the registry's parity lengths share no 2-D grid (2-D cases: tests/test_structured.py)
    test_params=({"block": 4, "grid": 3}, {"block": 1, "grid": 5}),
    bench_params=_bench,
)
