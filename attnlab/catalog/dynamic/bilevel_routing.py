"""``bilevel_routing`` (BiFormer's bi-level routing attention, Zhu et al., CVPR 2023): the token grid is cut
into regions; each region routes to the ``topk`` regions of highest pooled-query x pooled-key affinity,
and every token of a region attends to all tokens of its routed regions.

Grid and regions: ``shape`` is the token grid, (N,) by default (1-D) or (H, W) in raster order (the last
axis fastest, as in :mod:`attnlab.catalog.structured._grid`); ``regions`` = (S_0[, S_1]) regions per axis
(BiFormer's ``n_win`` x ``n_win``). Coordinate c on an axis of length L lies in region c * S // L
(contiguous, sizes differing by at most one; BiFormer's own split when S divides L). Regions are numbered
in raster order::

    shape=(4, 6), regions=2: 4 regions of 2 x 3 tokens     token t -> region
      0  1  2 |  3  4  5                                     0 0 0 1 1 1
      6  7  8 |  9 10 11                                     0 0 0 1 1 1
      ---------+---------                                    2 2 2 3 3 3
     12 13 14 | 15 16 17                                     2 2 2 3 3 3
     18 19 20 | 21 22 23

Estimator, per batch element (fp32; one routing for every head, as in BiFormer)::

    qbar_r = mean of q over the tokens of region r, kbar_r likewise (per head; GQA: the kv head)
    A[r, r'] = sum over query heads h of qbar_r[h] . kbar_r'[kv(h)]   (BiFormer's dot of the concatenated
                                                                       multi-head vectors; its scale
                                                                       does not change the top-k)
    causal: -inf where region r' has no token at or before the last token of region r
    routed[r] = the topk highest entries of A[r] (at most the number of regions; ``local`` forces r)

Attention: token i attends token j when routed[region(i), region(j)] (causal: and j <= i), exact softmax
over those keys. The plan's tiles are those holding such a pair (B, 1, NQB, NKB); a tile inside one query
region and one key region that is routed is full (causal: and wholly in the past), the others partial
with the routing rule. With regions made of whole tiles (1-D, N / S a multiple of ``block``) every
visited tile is full. On a 2-D grid the tiles of raster order cut across regions (a tile is visited when
any of its pairs is routed), so the block density can be far above the token density: the executor's
speed follows the former (a region-major token order, which is not a plan, would remove the gap). A row
with no allowed key (causal, own region not routed and the routed ones all
in its future) gives zeros; ``local=True`` rules that out.

Checked against the official code (rayleizhu/BiFormer @1697bbb, ``ops/bra_legacy.py``):
``BiLevelRoutingAttention.forward`` (NHWC split into n_win x n_win regions, asserting divisibility unless
``auto_pad``; region descriptors are the region means of the full multi-head q and k, detached; the
routed K/V gathered region-wise and attended by every query of the region, per head, with softmax),
``TopkRouting.forward`` (logits (q_r * scale) @ k_r^T, ``torch.topk`` per region, the routing weights
unused with the default ``mul_weight='none'``; the region's own window is not forced), ``KVGather``;
defaults from the class (n_win 7, topk 4) and ``models/biformer.py`` (stage topks 1, 4, 16).
Not included: the projections and LePE (a depthwise convolution of V added to the output) belong to the
module around the attention; ``kv_downsample_mode`` other than 'identity'; BiFormer scales the token
logits by (all heads' qk dim)^-0.5, attnlab by the call's ``scale`` (pass it to match). Added here: 1-D
grids, uneven region splits, causal routing (a region routes only to regions with a visible key, the
card's LLM adaptation) and ``local``; batch > 1 and GQA without repeating k.

Defaults: ``regions`` 7 per axis, ``topk`` 4, ``local`` False (BiFormer); ``block`` 64 is the plan's tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.catalog.dynamic._tiles import BLOCKS, causal_mask_mod, geometry, plan_reference
from attnlab.catalog.structured import _grid
from attnlab.core import MethodSpec
from attnlab.errors import InputError, ParamError
from attnlab.masks import MaskMod
from attnlab.params import Params
from attnlab.patterns import SELF_PATTERNS
from attnlab.plans import Plan


@dataclass(frozen=True)
class BilevelRoutingParams(Params):
    """``shape``: the token grid, None (1-D over the sequence) or (L,) or (H, W) with product N.
    ``regions``: regions per axis, an int for every axis or one per axis, each >= 1 and at most its axis
    (default 7). ``topk``: regions each region routes to (>= 1, capped at the number of regions; default
    4). ``local``: always route a region to itself (default False, as BiFormer). ``block``: the plan's tile
    size, one of 16, 32, 64, 128, 256 (default 64)."""

    method = "bilevel_routing"
    shape: tuple[int, ...] | None = None
    regions: int | tuple[int, ...] = 7
    topk: int = 4
    local: bool = False
    block: int = 64

    def __post_init__(self) -> None:
        for name in ("shape", "regions"):
            object.__setattr__(self, name, _grid.as_tuple(getattr(self, name)))
        super().__post_init__()

    def per_axis(self) -> tuple[int, ...]:
        """``regions`` as one count per axis of the grid."""
        n_axes = 1 if self.shape is None else len(self.shape)
        return _grid.per_axis(self.method, "regions", self.regions, n_axes)

    def validate(self) -> None:
        _grid.check_shape(self.method, self.shape, max_axes=2)
        regions = self.per_axis()
        if self.shape is not None:
            _grid.check_fits(self.method, "regions", regions, self.shape)
        self.check_int("topk", minimum=1)
        self.check_bool("local")
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"bilevel_routing: block={self.block!r}; the executor takes tiles of {BLOCKS}")

    def check_lengths(self, n_q: int, n_k: int) -> None:
        _grid.grid_of(self.method, self.shape, n_q, n_k)


def region_of(params: BilevelRoutingParams, n: int, device: torch.device) -> tuple[Tensor, int]:
    """(long (N,): the region of each token in raster order, number of regions). Raises InputError when
    the grid does not hold N tokens or an axis of a given ``shape`` is shorter than its region count; a 1-D
    sequence (``shape=None``) shorter than ``regions`` gets one region per token."""
    shape = _grid.grid_of(params.method, params.shape, n, n)
    regions = params.per_axis()
    if params.shape is None:  # a 1-D sequence shorter than its region count: one region per token
        regions = (min(regions[0], n),)
    for axis, (s, length) in enumerate(zip(regions, shape, strict=True)):
        if s > length:
            raise InputError(
                f"bilevel_routing: regions={params.regions!r} asks for {s} regions on axis {axis} of length "
                f"{length} (grid {shape}); expected at most {length} (every region needs a token)"
            )
    t = torch.arange(n, device=device)
    rid = torch.zeros_like(t)
    for s, length, stride in zip(regions, shape, _grid.raster_strides(shape), strict=True):
        coord = (t // stride) % length
        rid = rid * s + torch.div(coord * s, length, rounding_mode="floor")
    return rid, math.prod(regions)


def routing(q: Tensor, k: Tensor, params: BilevelRoutingParams, *, causal: bool) -> tuple[Tensor, Tensor]:
    """(routed bool (B, NR, NR): region r attends region r'; region (N,) long) for q (B, H, N, D),
    k (B, H_kv, N, D) (see the module docstring)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    rid, nr = region_of(params, n, q.device)
    count = torch.zeros(nr, device=q.device).index_add_(0, rid, torch.ones(n, device=q.device))
    qbar = torch.zeros(b, h, nr, d, device=q.device).index_add_(2, rid, q.detach().float()) / count[:, None]
    kbar = torch.zeros(b, hkv, nr, d, device=q.device).index_add_(2, rid, k.detach().float()) / count[:, None]
    qsum = qbar.view(b, hkv, h // hkv, nr, d).sum(2)  # the query heads of each kv head
    affinity = (qsum @ kbar.transpose(-1, -2)).sum(1)  # (B, NR, NR)
    if causal:
        t = torch.arange(n, device=q.device)
        first = torch.full((nr,), n, device=q.device, dtype=torch.long).scatter_reduce_(0, rid, t, "amin")
        last = torch.full((nr,), -1, device=q.device, dtype=torch.long).scatter_reduce_(0, rid, t, "amax")
        affinity = affinity.masked_fill(~(first[None, :] <= last[:, None]), float("-inf"))
    if params.local:
        affinity = affinity.masked_fill(torch.eye(nr, dtype=torch.bool, device=q.device), float("inf"))
    top = torch.topk(affinity, min(params.topk, nr), dim=-1)
    routed = torch.zeros_like(affinity, dtype=torch.bool).scatter_(
        -1, top.indices, top.values > float("-inf")
    )
    return routed, rid


def _rule(routed: Tensor, rid: Tensor, causal: bool) -> MaskMod:
    """mask_mod: routed[b, region(q_idx), region(kv_idx)] (and the causal rule)."""
    n = rid.shape[0]
    before = causal_mask_mod(0)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rq = rid[q_idx.long().clamp(0, n - 1)]
        rk = rid[kv_idx.long().clamp(0, n - 1)]
        ok = routed[b.long(), rq, rk]
        return ok & before(b, h, q_idx, kv_idx) if causal else ok

    return mask_mod


def estimate(q: Tensor, k: Tensor, params: BilevelRoutingParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N, D), k (B, H_kv, N, D) (see the module docstring; ``scale``
    does not change the routing)."""
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q != n_k:
        raise InputError(
            f"bilevel_routing routes regions of one token grid: it needs N_q == N_k (self-attention), got "
            f"N_q={n_q}, N_k={n_k}"
        )
    routed, rid = routing(q, k, params, causal=causal)
    bs = params.block
    geo = geometry(n_q, n_k, bs, q.device)
    nr = routed.shape[-1]
    pad = geo.nqb * bs - n_q
    tile_rid = torch.nn.functional.pad(rid, (0, pad), value=nr).view(geo.nqb, bs)  # padding: region nr
    holds = torch.zeros(geo.nqb, nr + 1, device=q.device).scatter_(1, tile_rid, 1.0)[:, :nr]  # (NB, NR)
    tiles = (holds @ routed.float() @ holds.T) > 0  # (B, NB, NB): a routed pair inside the tile
    pure = ((tile_rid == tile_rid[:, :1]) | (tile_rid == nr)).all(1)  # the tile's tokens in one region
    one = tile_rid[:, 0]
    whole = routed[:, one][:, :, one] & pure[:, None] & pure[None, :]
    if causal:
        tiles &= geo.allowed(True)
        whole &= geo.whole()
    full = tiles & whole
    return Plan(n_q, n_k, causal, bs, bs, full[:, None], (tiles & ~whole)[:, None], _rule(routed, rid, causal),
                kind="dynamic")  # fmt: skip


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, int | bool]]:
    """1-D, 32 regions, the own region routed: 2 and 4 routed regions (about 1/8 and 1/4 of the causal
    tiles; 1/16 and 1/8 of the pairs without causality), then BiFormer's defaults (7 regions, top 4)."""
    return [
        {"regions": 32, "topk": 2, "local": True, "block": 128},
        {"regions": 32, "topk": 4, "local": True, "block": 128},
        {},
    ]


SPEC = MethodSpec(
    name="bilevel_routing",
    family="dynamic",
    paper="BiFormer: Bi-Level Routing Attention (Zhu et al., CVPR 2023)",
    summary="regions of a 1-D/2-D token grid route to their top-k regions by pooled q . k; tokens attend to "
    "every token of the routed regions",
    param_class=BilevelRoutingParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=SELF_PATTERNS,
    estimate=estimate,
    # 1-D sets only: the registry's parity runs every set at lengths that are no (H, W) grid; the 2-D grid
    # runs in tests/test_bilevel_routing.py
    test_params=(
        {"regions": 5, "topk": 2, "local": True, "block": 16},
        {"regions": 3, "topk": 1, "block": 16},
    ),
    bench_params=_bench,
)
