"""``dhsa`` (Dynamic Hierarchical Sparse Attention, Xiong et al., 2025): keys cut into variable-length
chunks at the positions where the keys change, query blocks scored against chunks by length-normalised
pooled similarity, the chunk scores upsampled to key blocks, the best blocks kept. Causal prefill only.

Estimator, per batch element (fp32, shared by every head as in DHSA; ``bs`` = ``block``)::

    chunks: x_t = k[:, t] over all kv heads (concatenated); for t in [w, N_k - w] (w = boundary_window)
      novelty r_t = 1 - cos(mean x[t - w, t), mean x[t, t + w))
      a chunk may start at t when r_t > 0 is the largest within nms_window on each side (ties: the
      first); the (N_k // bs) * chunk_beta such t of highest r_t start chunks, position 0 too; with
      dense_last > 0, N_k - dense_last (the instruction start) is one of them, and no other start lies
      after it or within nms_window of it
    qbar_i = mean over heads and the rows of query block i of q, x sqrt(rows)   (DHSA's avgpool_norm;
    kbar_c = mean over kv heads and the tokens of chunk c of k, x sqrt(len_c)    without: no sqrt)
    S[i, c] = qbar_i . kbar_c                   (no 1/sqrt(d), as in DHSA)
    block importance T[i, j] = mean over the tokens t of key block j of S[i, chunk(t)] (the token scores
      DHSA upsamples, pooled back to the executor's tiles)
    keep ceil(budget / bs) blocks per query block among those with a key <= its last position: the
      blocks holding [0, sink) and the positions [min(first, last - local + 1), last] (always: the
      ``local`` positions before its last one and its own diagonal span, the key blocks of its positions
      first .. last, so every row keeps its own position even when the query block straddles two key
      blocks, N_k - N_q not a multiple of bs), then the highest T; the budget counts the forced blocks of
      [0, sink) and [last - local + 1, last] (kept even beyond it), and the span's one more block, when
      it adds one, on top; query blocks holding one of the last ``dense_last`` queries keep every block

The kept tiles form the plan (B, 1, NQB, NKB) (one plan for all heads); tiles straddling the diagonal are
partial with the causal rule. Attention is exact softmax attention over the plan's pairs.

Checked against the official code (xiongsiheng/DHSA @cc8e9c7, the paper's algorithm in
``legacy/utils/helper.py``): ``_obtain_dhsa_mask`` (q and k averaged over heads in fp32, query blocks
mean-pooled and scaled by sqrt of their real length, chunks by prefix sums scaled by sqrt(length) under
``avgpool_norm``, scores q . k without scaling, upsampled by gathering each token's chunk score, the
block-causal mask "key < (i + 1) * block_size", the most recent ``local_tokens`` allowed keys forced,
top-k of the rest), ``dhsa_sdpa`` (the last ``instruction_tokens`` = 64 queries attend densely; the
first 128 slots overwritten by ``global_tokens``), ``predict_boundaries`` / ``_select_boundary_candidates``
(num_chunks = (N // block_size) * chunk_beta, the instruction start always a boundary and none after
it, score-ordered NMS, boundary = position + 1, 0 and N added) and ``_compute_cumulative_attention_mass_
ratio`` (past / future windows of ``boundary_window_size``); defaults from ``legacy/scripts/
run_longbench.sh`` (block_size 128, budget_prefill 2048, window 4, NMS 8, avgpool_norm) and
``legacy/run_needle_in_haystack.py`` (chunk_beta 8).
Deliberate differences: DHSA's boundaries come from a learned predictor (weights trained on attention-mass
ratios of a model, not available here); ours are training-free, the key-novelty rule above, with a
vectorised NMS (local maxima) instead of the greedy one. DHSA selects tokens; the executor runs tiles, so
the budget, the sink (DHSA's global tokens, which overwrite selected slots) and the local tokens count
in whole blocks, and a block's importance is the mean of its tokens' upsampled scores. Batch > 1 works
with a different chunk count per sequence (the official ``torch.tensor`` of ragged boundaries fails);
N_q < N_k (cross, bottom-right) is defined. The HEAD variant (``Block-Sparse-Attention/DHSA_patch.py``,
fixed blocks with a vertical-slash mix) is a different method.

Defaults: ``budget`` 2048 tokens, ``block`` 128, ``chunk_beta`` 8, ``boundary_window`` 4, ``nms_window``
8, ``local`` 128, ``sink`` 128, ``dense_last`` 64, ``sqrt_scale`` True.
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
    geometry,
    plan_reference,
    pool_mean,
    span_extra,
    tiles_plan,
    top_entries,
)
from attnlab.core import MethodSpec
from attnlab.errors import ParamError
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import Plan


@dataclass(frozen=True)
class DhsaParams(Params):
    """``budget``: key tokens kept per query block, in whole blocks (ceil(budget / block)), sink and local
    included (>= 1; default 2048). ``block``: tile size, one of 16, 32, 64, 128, 256 (default 128).
    ``chunk_beta``: at most (N_k // block) * chunk_beta chunks (>= 1; default 8). ``boundary_window``:
    keys on each side of a candidate boundary (>= 1; default 4). ``nms_window``: no two chunk starts
    closer than this (>= 0; default 8). ``local``: most recent positions always kept, rounded out to blocks
    (>= 1; the query block's diagonal span is always kept too; default 128). ``sink``: first positions always kept (>= 0;
    default 128). ``dense_last``: the last queries that attend densely (>= 0; default 64).
    ``sqrt_scale``: scale the pooled query block and chunk by sqrt of their lengths (default True)."""

    method = "dhsa"
    budget: int = 2048
    block: int = 128
    chunk_beta: int = 8
    boundary_window: int = 4
    nms_window: int = 8
    local: int = 128
    sink: int = 128
    dense_last: int = 64
    sqrt_scale: bool = True

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"dhsa: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_int("budget", minimum=1)
        self.check_int("chunk_beta", minimum=1)
        self.check_int("boundary_window", minimum=1)
        self.check_int("nms_window", minimum=0)
        self.check_int("local", minimum=1)
        self.check_int("sink", minimum=0)
        self.check_int("dense_last", minimum=0)
        self.check_bool("sqrt_scale")


def _window_max(r: Tensor, width: int, side: str) -> Tensor:
    """max of r (B, N) over the ``width`` entries before (side "left") / after ("right") each entry."""
    pad = (width, 0) if side == "left" else (0, width)
    padded = torch.nn.functional.pad(r, pad, value=float("-inf"))
    pooled = torch.nn.functional.max_pool1d(padded[:, None], width, stride=1)[:, 0]
    return pooled[:, : r.shape[1]] if side == "left" else pooled[:, 1:]


def chunk_starts(k: Tensor, params: DhsaParams) -> Tensor:
    """bool (B, N_k): the positions where a chunk starts (position 0 always), for k (B, H_kv, N_k, D)."""
    b, _, n, _ = k.shape
    w, nms, dev = params.boundary_window, params.nms_window, k.device
    t = torch.arange(n, device=dev)
    r = torch.zeros(b, n, device=dev)
    if n >= 2 * w:  # window means m[s] = mean x[s, s + w); left of t: m[t - w], right: m[t]
        x = k.detach().float().permute(0, 1, 3, 2).reshape(b, -1, n)  # (B, F, N)
        m = torch.nn.functional.avg_pool1d(x, w, stride=1)  # (B, F, N - w + 1)
        dots = (m[..., : n - 2 * w + 1] * m[..., w:]).sum(1)
        norms = (m * m).sum(1)
        cos = dots / (norms[:, : n - 2 * w + 1] * norms[:, w:]).sqrt().clamp_min(1e-12)
        r[:, w : n - w + 1] = 1.0 - cos
    inst = n - params.dense_last if 0 < params.dense_last < n else n
    valid = (t >= w) & (t <= n - w) & (t < inst - nms) & (r > 1e-6)
    r = r.masked_fill(~valid, float("-inf"))
    if nms > 0:
        valid &= (r > _window_max(r, nms, "left")) & (r >= _window_max(r, nms, "right"))
        r = r.masked_fill(~valid, float("-inf"))
    count = (n // params.block) * params.chunk_beta - (1 if inst < n else 0)
    starts = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if count > 0:
        top = torch.topk(r, min(count, n), dim=-1)
        starts.scatter_(1, top.indices, torch.isfinite(top.values))
    starts[:, 0] = True
    if inst < n:
        starts[:, inst] = True
    return starts


def chunk_scores(q: Tensor, k: Tensor, starts: Tensor, params: DhsaParams) -> tuple[Tensor, Tensor]:
    """(S (B, NQB, C) fp32: query block x chunk scores, chunk (B, N_k) long: each key's chunk) for
    q (B, H, N_q, D), k (B, H_kv, N_k, D) and chunk starts (B, N_k) (C = the most chunks of a sequence;
    padding chunks score 0 and hold no key)."""
    b, n_q = q.shape[0], q.shape[2]
    bs = params.block
    chunk = torch.cumsum(starts.long(), 1) - 1  # (B, N_k)
    n_c = int(chunk.max()) + 1
    kbar = k.detach().mean(1, dtype=torch.float32)  # (B, N_k, D) (fp32 sums, no fp32 copy of k)
    sums = torch.zeros(b, n_c, kbar.shape[-1], device=k.device).scatter_add_(
        1, chunk[..., None].expand_as(kbar), kbar
    )
    lens = torch.zeros(b, n_c, device=k.device).scatter_add_(1, chunk, torch.ones_like(kbar[..., 0]))
    k_repr = sums / lens.clamp_min(1)[..., None]
    q_repr = pool_mean(q.detach().mean(1, keepdim=True, dtype=torch.float32), bs)[:, 0]  # (B, NQB, D)
    if params.sqrt_scale:
        rows = torch.full((q_repr.shape[1],), float(bs), device=q.device)
        rows[-1] = n_q - (q_repr.shape[1] - 1) * bs
        q_repr = q_repr * rows.sqrt()[:, None]
        k_repr = k_repr * lens.sqrt()[..., None]
    return q_repr @ k_repr.transpose(1, 2), chunk


def block_importance(scores: Tensor, chunk: Tensor, block: int) -> Tensor:
    """T (B, NQB, NKB): the mean over each key block's tokens of their chunk's score."""
    b, _, n_c = scores.shape
    n = chunk.shape[1]
    nkb = -(-n // block)
    tile = torch.arange(n, device=chunk.device) // block
    overlap = torch.zeros(b, nkb * n_c, device=scores.device)
    overlap.scatter_add_(1, tile * n_c + chunk, torch.ones(b, n, device=scores.device))
    overlap = overlap.view(b, nkb, n_c)
    return (scores @ overlap.transpose(1, 2)) / overlap.sum(-1)[:, None, :]


def estimate(q: Tensor, k: Tensor, params: DhsaParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring;
    ``scale`` does not enter the scores, as in DHSA)."""
    if not causal:
        raise ParamError("dhsa is a causal prefill method; call it with causal=True")
    bs, n_q, n_k = params.block, q.shape[2], k.shape[2]
    geo = geometry(n_q, n_k, bs, q.device)
    scores, chunk = chunk_scores(q, k, chunk_starts(k, params), params)
    importance = block_importance(scores, chunk, bs)  # (B, NQB, NKB)
    allowed = geo.allowed(True)
    j = torch.arange(geo.nkb, device=q.device)[None, :]
    recent = torch.clamp(geo.q_last - params.local + 1, 0, n_k - 1) // bs  # the last `local` positions
    first_local = torch.minimum(recent, geo.local_first())  # ... and the query block's diagonal span
    sink = j < -(-params.sink // bs)
    forced = (sink | ((j >= first_local[:, None]) & (j <= geo.local()[:, None]))) & allowed
    counted = (sink | ((j >= recent[:, None]) & (j <= geo.local()[:, None]))) & allowed
    ranked = importance.masked_fill(~allowed, float("-inf")).masked_fill(forced, float("inf"))
    keep = top_entries(ranked, math.ceil(params.budget / bs), span_extra(forced, counted))
    dense_rows = geo.q_last - geo.offset >= n_q - params.dense_last  # blocks holding a dense query
    keep = keep | forced | (dense_rows[:, None] & allowed)
    return tiles_plan(keep[:, None], geo, True)


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, int]]:
    """block_topk's budgets (1/16 and 1/8 of the key blocks: about 1/8 and 1/4 of the causal tiles) without
    the sink and the dense last queries, then the paper's setting (budget 2048 tokens, block 128)."""
    blocks = -(-n // 128)
    return [
        {"block": 128, "budget": 128 * max(2, blocks // 16), "sink": 0, "dense_last": 0},
        {"block": 128, "budget": 128 * max(2, blocks // 8), "sink": 0, "dense_last": 0},
        {},
    ]


SPEC = MethodSpec(
    name="dhsa",
    family="dynamic",
    paper="DHSA: Dynamic Hierarchical Sparse Attention (Xiong et al., 2025)",
    summary="variable-length key chunks, sqrt(length)-scaled pooled query-block x chunk scores upsampled to "
    "key blocks, top blocks per query block (shared by the heads)",
    param_class=DhsaParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
    estimate=estimate,
    test_params=(
        {"block": 16, "budget": 32, "chunk_beta": 2, "local": 16, "sink": 16, "dense_last": 8},
        {
            "block": 16,
            "budget": 48,
            "chunk_beta": 1,
            "local": 1,
            "sink": 0,
            "dense_last": 0,
            "sqrt_scale": False,
        },
    ),
    bench_params=_bench,
)
