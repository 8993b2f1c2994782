"""``token_sparse`` (Token Sparse Attention, Jo et al., 2026): per head, keep a subset of the tokens,
attend causally among them only, and give the dropped query rows zeros (their residual passes unchanged).
Causal self-attention (prefill) only.

Estimator, per batch element (fp32; W = ``window``, N = N_q = N_k)::

    A = softmax(scale * q[-W:] k^T) over the keys each of the last W queries may see
    s[h, j] = mean_r A[h, r, j] for the prefix keys j < N - W, smoothed by avg_pool1d(``kernel``,
              stride 1, zero padding kernel // 2, padded zeros counted)
    s_norm[h] = s[h] / sum s[h];   g = mean_h s[h] / sum (mean_h s[h])      (one global vector)
    n_drop = #{ascending cumsum of g < coverage}, + 1 when > 0   (the same for every head)
    keep = max(min_tokens, (N - W) - n_drop);  tokens of head h = its top-``keep`` prefix keys by
           s_norm[h], plus the window [N - W, N)
    nothing is dropped (dense causal attention) when N <= min_tokens + W, coverage = 0 or n_drop = 0

Attention: query i of head h attends key j when both are kept and ``j <= i``: exactly the compressed
sequence's causal attention, scattered back (dropped rows: zeros). The plan visits the tiles where a
kept query block meets a kept key block; a tile whose rows and columns are all kept is full, the others
partial with the rule "both kept and causal".

Checked against the official code (dongwonjo/Token-Sparse-Attention, ``sparse_attn/token_sparse/
sparse_cluster.py``: ``SparseCluster.get_index`` (the skip rule, ``avg_pool1d`` with padding
kernel // 2, per-head and head-mean normalisation with +1e-8, ascending cumsum ``< coverage`` then +1,
``max(min_tokens, (q_len - window) - n_drop)``, per-head ``topk`` plus the window, sorted),
``compress_qkv`` / ``decompress_output`` (one index set gathers q, k and v; zeros scattered for the
dropped rows); the score kernel (``triton_get_attn_cache``, the mean over the window's queries of the
causal softmax) is taken from the literature card). Differences: batch > 1 (one drop count per batch
element; the official ``.item()`` needs B = 1), GQA without repeating k, v in memory (the selection is
per query head as after ``repeat_kv``).

Defaults: ``coverage`` 0.005 (the dropped share of the global mass), ``min_tokens`` 1024, ``window``
128, ``kernel`` 7 (the official scripts); ``block`` 64 is the plan's tile size. The paper applies the
method to some layers only (e.g. Llama-3.1-8B layers 15-30): that choice belongs to the caller.

Speed note: the executor skips only tiles whose query or key block is wholly dropped; the paper's speedup
comes from gathering the kept tokens into a shorter dense sequence, which is not a plan (a gather-then-SDPA
backend would be).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.catalog.dynamic._tiles import BLOCKS, causal_mask_mod, geometry, last_query_probs, plan_reference
from attnlab.core import MethodSpec
from attnlab.errors import InputError, ParamError
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import Plan


@dataclass(frozen=True)
class TokenSparseParams(Params):
    """``coverage``: share of the (global) estimated attention mass that may be dropped, in [0, 1]
    (default 0.005; 0 = dense). ``min_tokens``: prefix tokens always kept per head (>= 0, default 1024).
    ``window``: last queries that estimate, always kept (>= 1, default 128). ``kernel``: odd smoothing
    width (default 7). ``block``: the plan's tile size, one of 16, 32, 64, 128, 256 (default 64)."""

    method = "token_sparse"
    coverage: float = 0.005
    min_tokens: int = 1024
    window: int = 128
    kernel: int = 7
    block: int = 64

    def validate(self) -> None:
        self.check_float("coverage")
        if not 0.0 <= float(self.coverage) <= 1.0:
            raise ParamError(f"token_sparse: coverage={self.coverage!r} must be in [0, 1] (0 = dense)")
        self.check_int("min_tokens", minimum=0)
        self.check_int("window", minimum=1)
        self.check_int("kernel", minimum=1)
        if self.kernel % 2 == 0:
            raise ParamError(f"token_sparse: kernel={self.kernel} must be odd (a centred smoothing window)")
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"token_sparse: block={self.block!r}; the executor takes tiles of {BLOCKS}")


def kept_tokens(q: Tensor, k: Tensor, params: TokenSparseParams, scale: float) -> Tensor:
    """bool (B, H, N): the tokens each query head keeps (see the module docstring)."""
    b, h, n = q.shape[:3]
    w = params.window
    keep_all = torch.ones(b, h, n, dtype=torch.bool, device=q.device)
    if n <= params.min_tokens + w or params.coverage == 0:
        return keep_all
    a, _ = last_query_probs(q, k, w, scale)
    s = a.mean(2)[..., : n - w]  # (B, H, N - W)
    pad = params.kernel // 2
    s = torch.nn.functional.avg_pool1d(s, params.kernel, stride=1, padding=pad)
    s_norm = s / (s.sum(-1, keepdim=True) + 1e-8)
    g = s.mean(1)
    g = g / (g.sum(-1, keepdim=True) + 1e-8)  # (B, N - W)
    csum = torch.cumsum(torch.sort(g, dim=-1).values, dim=-1)
    n_drop = (csum < params.coverage).sum(-1)  # (B,)
    n_drop = torch.where(n_drop > 0, n_drop + 1, 0)
    keep = torch.clamp((n - w) - n_drop, min=params.min_tokens).clamp(max=n - w)  # (B,)
    kmax = int(keep.max())
    top = torch.topk(s_norm, kmax, dim=-1).indices  # (B, H, kmax)
    within = torch.arange(kmax, device=q.device) < keep[:, None, None]
    kept = torch.zeros(b, h, n, dtype=torch.bool, device=q.device)
    kept[..., : n - w].scatter_(-1, top, within.expand(b, h, kmax))
    kept[..., n - w :] = True
    return torch.where((n_drop > 0)[:, None, None], kept, keep_all)


def _rule(kept: Tensor):  # type: ignore[no-untyped-def]
    """mask_mod: query and key both kept (by the plan's (b, h)) and ``kv_idx <= q_idx``."""
    n = kept.shape[-1]
    causal = causal_mask_mod(0)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bl, hl = b.long(), h.long()
        qk = kept[bl, hl, q_idx.long().clamp(max=n - 1)]
        kk = kept[bl, hl, kv_idx.long().clamp(max=n - 1)]
        return qk & kk & causal(b, h, q_idx, kv_idx)

    return mask_mod


def estimate(q: Tensor, k: Tensor, params: TokenSparseParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N, D), k (B, H_kv, N, D) (see the module docstring)."""
    if not causal:
        raise ParamError("token_sparse is a causal prefill method; call it with causal=True")
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q != n_k:
        raise InputError(
            f"token_sparse compresses q, k and v with one index set: it needs N_q == N_k (self-attention), "
            f"got N_q={n_q}, N_k={n_k}"
        )
    kept = kept_tokens(q, k, params, scale)
    bs = params.block
    geo = geometry(n_q, n_k, bs, q.device)
    b, h, n = kept.shape
    nb = geo.nqb
    padded = torch.nn.functional.pad(kept, (0, nb * bs - n), value=True).view(b, h, nb, bs)
    real = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool, device=q.device), (0, nb * bs - n))
    real = real.view(nb, bs)
    anyk = (padded & real).any(-1)  # (B, H, NB): the block holds a kept token
    allk = padded.all(-1)  # every (real) token of the block kept
    tiles = anyk[..., :, None] & anyk[..., None, :] & geo.allowed(True)
    whole = allk[..., :, None] & allk[..., None, :] & geo.whole()
    return Plan(n_q, n_k, True, bs, bs, tiles & whole, tiles & ~whole, _rule(kept), kind="dynamic")


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, float | int]]:
    """min_tokens-bound budgets (coverage 1 drops everything it may) keeping about 35% and 50% of the
    prefix (about 1/8 and 1/4 of the causal pairs), then the paper's coverage 0.005."""
    return [
        {"coverage": 1.0, "min_tokens": max(1, int(0.35 * n))},
        {"coverage": 1.0, "min_tokens": max(1, n // 2)},
        {"coverage": 0.005},
    ]


SPEC = MethodSpec(
    name="token_sparse",
    family="dynamic",
    paper="Token Sparse Attention (Jo et al., 2026)",
    summary="per head, a kept token subset (the last window's pooled attention, a dropped-mass budget); "
    "causal attention among kept tokens, zeros for dropped rows",
    param_class=TokenSparseParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=frozenset({Pattern.CAUSAL_SELF}),
    estimate=estimate,
    test_params=(
        {"coverage": 0.3, "min_tokens": 4, "window": 4, "kernel": 3, "block": 16},
        {"coverage": 1.0, "min_tokens": 9, "window": 3, "kernel": 1, "block": 16},
    ),
    bench_params=_bench,
)
