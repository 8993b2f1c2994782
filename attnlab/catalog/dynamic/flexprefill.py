"""``flexprefill`` (FlexPrefill, Lai et al., ICLR 2025): per head, a vertical-slash block pattern sized to
cover a share ``gamma`` of the last queries' attention, plus, on heads whose pooled block estimate agrees
with the true distribution (Jensen-Shannon test), query-aware blocks chosen by cumulative pooled mass.
Causal prefill only.

Estimator, per batch and query head (fp32; ``bs`` = ``block``, R = min(bs, N_q) last queries)::

    A = softmax(scale * q[-R:] k^T) over the keys each of the last R queries may see
    vertical[j] = mean_r A[r, j]                 slash[o] = mean_r A[r, p_r - o]   (o = distance)
    n_v = (#{cumsum of sorted vertical <= gamma} + 1) // bs + 1 blocks, clamped to [min_b, max_b]
    n_s likewise from slash                       (min_b = ceil(min_budget / bs), max_b likewise)
    V[j] = sum of vertical over key block j       S[c] = sum of slash over distances [c bs, (c+1) bs)
    a_hat = softmax_j(scale * mean_r q[-R:] . kbar_j)      (kbar_j = mean of k over key block j)
    D = sqrt(JSD(a_hat, V))  (natural log);  D < tau: a query-aware head, n_v = n_s = min_b
    keep key block 0 and distance block 0, then the top n_v blocks of V and the top n_s of S:
      a vertical block j is visited by every query block that may see it; a slash block c by query
      block i at the key blocks l - c for each key block l of i's diagonal span (the key blocks holding
      one of i's positions: one block, or two when N_k - N_q is not a multiple of bs, as in chunked
      prefill after a cached prefix), so distance block 0 is the whole span
    query-aware heads also keep, over the whole grid, the highest entries of the block-causal row
    softmax of scale * qbar_i . kbar_j (qbar_i: mean of q over query block i) while their cumulative
    sum stays <= gamma * (rows with a visible block)

The kept tiles form the plan (B, H, NQB, NKB); tiles straddling the diagonal are partial with the causal
rule. Short inputs are dense, as in FlexPrefill: when N_k <= max(2 bs, min_b bs) or N_q == 1 every causal
tile is kept. Attention is exact softmax attention over the plan's pairs; the diagonal span is always
kept, so every query with a visible key sees at least its own position (the budgets count distance
blocks, not tiles: a span of two key blocks puts each kept distance block on up to two tiles per row).

Checked against the official code (ByteDance-Seed/FlexPrefill, ``flex_prefill/ops/
flex_prefill_attention.py``): ``get_active_blocks`` (last ``block_size`` queries, fp32 softmax with the
causal corner, vertical = row mean, slash = diagonal sums / rows, ``score_cover_topk`` budget ``n // 128
+ 1`` clamped to [min, max] blocks, sum pooling, ``square_root_js_divergence`` of the softmax over
block-mean keys of the mean last query against the pooled vertical, ``kl_div < tau`` query-aware with
budgets reset to min, forced first vertical / diagonal slash block, ``transform_veritcal_slash_idx``
rows i >= j and (i + o, i), the query-aware loop's block-causal softmax of block means flattened and
cut by ``score_cover_idx(attn, gamma * num_blocks)``) and ``flex_prefill_attention`` (the dense
short-input rule, budgets ``ceil(budget / block_size)``, ``max_budget`` capped at the block count).
Deliberate differences: the budget divides by ``block`` where the official code hard-codes 128
(identical at the default block 128); distance blocks are aligned to distance 0 (the official sum pooling
over the diagonal index aligns them only when ``bs`` divides N); the JS divergence takes 0 log 0 = 0
(the official one gives NaN, hence "not query-aware", for an exactly empty block); batch > 1 works
(official: ``assert batch_size == 1``), and N_q < N_k (cross, bottom-right) is defined.

Defaults: ``gamma`` 0.9, ``tau`` 0.1, ``min_budget`` 512 (the official README's settings; the paper's
scripts use gamma 0.95 for Llama-3.1 / GLM-4 and min_budget 1024), ``block`` 128, no ``max_budget``
(0). The official function's own defaults (tau 0: never query-aware, min_budget 1 token) are reachable
with ``tau=0, min_budget=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.catalog.dynamic._tiles import (
    BLOCKS,
    Geometry,
    diagonal_sums,
    geometry,
    last_query_probs,
    plan_reference,
    pool_mean,
    pool_sum,
    tiles_plan,
)
from attnlab.core import MethodSpec
from attnlab.errors import ParamError
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import Plan


@dataclass(frozen=True)
class FlexPrefillParams(Params):
    """``gamma``: share of the estimated attention to cover, in (0, 1] (default 0.9).
    ``tau``: Jensen-Shannon threshold; heads with sqrt(JSD) < tau are query-aware (>= 0; default 0.1;
    0 = never). ``min_budget`` / ``max_budget``: tokens, rounded up to blocks, bounding the vertical and
    the slash budget each (min >= 1, default 512; max 0 = no cap, else >= min_budget). ``block``: tile
    size, one of 16, 32, 64, 128, 256 (default 128); also the number of last queries that estimate."""

    method = "flexprefill"
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    max_budget: int = 0
    block: int = 128

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"flexprefill: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_float("gamma")
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ParamError(f"flexprefill: gamma={self.gamma!r} must be in (0, 1] (share of attention)")
        self.check_float("tau")
        if float(self.tau) < 0:
            raise ParamError(f"flexprefill: tau={self.tau!r} must be >= 0 (0: no query-aware head)")
        self.check_int("min_budget", minimum=1)
        self.check_int("max_budget", minimum=0)
        if 0 < self.max_budget < self.min_budget:
            raise ParamError(
                f"flexprefill: max_budget={self.max_budget} is below min_budget={self.min_budget} "
                "(0 means no cap)"
            )


def _cover_blocks(dist: Tensor, gamma: float, block: int) -> Tensor:
    """Blocks needed to cover ``gamma`` of each distribution (..., N): tokens in the sorted cumulative
    sum at or below gamma, plus one, in blocks (``n // block + 1``)."""
    csum = torch.cumsum(torch.sort(dist, dim=-1, descending=True).values, dim=-1)
    tokens = (csum <= gamma).sum(-1) + 1
    return torch.div(tokens, block, rounding_mode="floor") + 1


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions over the last dim;
    0 log 0 counts as 0. In [0, sqrt(ln 2)]."""
    m = (p + q) / 2
    kl_p = torch.where(p > 0, p * torch.log(p / m), 0.0).sum(-1)
    kl_q = torch.where(q > 0, q * torch.log(q / m), 0.0).sum(-1)
    return torch.sqrt((0.5 * kl_p + 0.5 * kl_q).clamp_min(0.0))


def _top_set(score: Tensor, count: Tensor) -> Tensor:
    """bool like ``score`` (..., M): the ``count[...]`` highest entries of each row."""
    kmax = int(min(int(count.max()), score.shape[-1]))
    top = torch.topk(score, kmax, dim=-1).indices
    within = torch.arange(kmax, device=score.device) < count[..., None]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, within)


def head_choice(q: Tensor, k: Tensor, params: FlexPrefillParams, scale: float) -> tuple[Tensor, Tensor]:
    """(D (B, H): sqrt-JSD between the pooled estimate and the last queries' block distribution,
    query_aware (B, H) bool: D < tau) for q (B, H, N_q, D), k (B, H_kv, N_k, D)."""
    bs, h = params.block, q.shape[1]
    a, _ = last_query_probs(q, k, bs, scale)
    vertical = pool_sum(a.mean(2), bs)
    return _choice(q, k, vertical, bs, h, scale, params.tau)


def _choice(
    q: Tensor, k: Tensor, vertical: Tensor, bs: int, h: int, scale: float, tau: float
) -> tuple[Tensor, Tensor]:
    r = min(bs, q.shape[2])
    kbar = pool_mean(k, bs).repeat_interleave(h // k.shape[1], dim=1)  # (B, H, NKB, D)
    qm = q[:, :, q.shape[2] - r :].detach().float().mean(2, keepdim=True)  # (B, H, 1, D)
    a_hat = torch.softmax((qm @ kbar.transpose(-1, -2)).squeeze(2) * scale, dim=-1)
    d = js_distance(a_hat, vertical)
    return d, d < tau


def _query_aware_tiles(q: Tensor, kbar: Tensor, geo: Geometry, gamma: float, scale: float) -> Tensor:
    """bool (B, H, NQB, NKB): the block-causal pooled softmax's largest entries, over the whole grid, while
    their cumulative sum stays <= gamma x (rows with a visible block)."""
    qbar = pool_mean(q, geo.block)
    allowed = geo.allowed(True)
    s = (qbar @ kbar.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    b, h, nqb, nkb = p.shape
    flat = p.reshape(b, h, nqb * nkb)
    vals, idx = torch.sort(flat, dim=-1, descending=True)
    rows = float(allowed.any(-1).sum())
    keep = torch.cumsum(vals, -1) <= gamma * rows
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, keep).view(b, h, nqb, nkb)


def estimate(q: Tensor, k: Tensor, params: FlexPrefillParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring)."""
    if not causal:
        raise ParamError("flexprefill is a causal prefill method; call it with causal=True")
    bs = params.block
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    geo = geometry(n_q, n_k, bs, q.device)
    min_b = math.ceil(params.min_budget / bs)
    max_b = geo.nkb if params.max_budget == 0 else min(geo.nkb, math.ceil(params.max_budget / bs))
    if n_q == 1 or n_k <= max(2 * bs, min_b * bs):  # FlexPrefill's short-input rule: dense
        return tiles_plan(torch.ones(b, h, geo.nqb, geo.nkb, dtype=torch.bool, device=q.device), geo, True)
    min_b = min(min_b, max_b)
    a, pos = last_query_probs(q, k, bs, scale)
    vertical = a.mean(2)  # (B, H, N_k)
    slash = diagonal_sums(a, pos) / a.shape[2]
    n_v = _cover_blocks(vertical, params.gamma, bs).clamp(min_b, max_b)
    n_s = _cover_blocks(slash, params.gamma, bs).clamp(min_b, max_b)
    v_blk, s_blk = pool_sum(vertical, bs), pool_sum(slash, bs)  # (B, H, NKB) each
    _, query_aware = _choice(q, k, v_blk, bs, h, scale, float(params.tau))
    n_v = torch.where(query_aware, min_b, n_v)
    n_s = torch.where(query_aware, min_b, n_s)
    v_blk[..., 0] = float("inf")
    s_blk[..., 0] = float("inf")
    v_set = _top_set(v_blk, n_v)  # kept key blocks
    s_set = _top_set(s_blk, n_s)  # kept distance blocks
    dev = q.device
    j = torch.arange(geo.nkb, device=dev)[None, :]
    tiles = v_set[:, :, None, :].expand(-1, -1, geo.nqb, -1)
    for span_block in (geo.local_first(), geo.local()):  # the diagonal span's (one or two) key blocks
        c = span_block[:, None] - j  # (NQB, NKB): the distance block tile (i, j) stands for
        on = (c >= 0) & (c < geo.nkb)
        tiles = tiles | (s_set[:, :, c.clamp(0, geo.nkb - 1)] & on)
    if bool(query_aware.any()):
        kbar = pool_mean(k, bs).repeat_interleave(h // k.shape[1], dim=1)
        qa = _query_aware_tiles(q, kbar, geo, float(params.gamma), scale)
        tiles = tiles | (qa & query_aware[:, :, None, None])
    return tiles_plan(tiles, geo, True)


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, float | int]]:
    """The vertical-slash branch alone with budgets capped near block_topk's densities (about 1/8 and 1/4
    of the causal tiles at most), then the paper's setting (README: gamma 0.9, tau 0.1, min_budget 512),
    whose query-aware heads keep gamma of a pooled mass that is diffuse on random inputs (near-dense)."""
    low, high = max(128, n // 32), max(128, n // 16)
    return [
        {"gamma": 0.9, "tau": 0.0, "min_budget": min(512, low), "max_budget": low},
        {"gamma": 0.95, "tau": 0.0, "min_budget": min(1024, high), "max_budget": high},
        {"gamma": 0.9, "tau": 0.1, "min_budget": 512},
    ]


SPEC = MethodSpec(
    name="flexprefill",
    family="dynamic",
    paper="FlexPrefill (Lai et al., ICLR 2025)",
    summary="per head: vertical-slash blocks covering gamma of the last queries' attention, plus query-aware "
    "pooled blocks on heads passing a Jensen-Shannon test",
    param_class=FlexPrefillParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
    estimate=estimate,
    test_params=(
        {"block": 16, "gamma": 0.3, "tau": 0.1, "min_budget": 16},
        {"block": 16, "gamma": 0.6, "tau": 1.0, "min_budget": 16, "max_budget": 32},
    ),
    bench_params=_bench,
)
