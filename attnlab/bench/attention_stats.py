"""Is a workload's attention learned, or what i.i.d. random Q/K would give? Two statistics of the dense
softmax attention ``P = softmax(q k^T / sqrt(D))`` per head (non-causal, or causal for a causal model's
Q/K), and a verdict.

- ``entropy_ratio``: mean over query rows of H(P_i) / log N_k (1.0: uniform attention).
- ``key_sharing``: how much more attention mass the most-attended 2% of keys receive (summed over all
  queries) than they would if each query's weights were shuffled over the keys independently. Learned
  heads share favourite keys across queries (sinks, separators, salient tokens): MiniLM's layers measure
  about 2-7x. Row-independent i.i.d. Gaussian scores cannot share keys: about 1.0-2.0x at any scale of Q/K,
  even when each row is peaked.
- ``locality``: the attention mass on keys within 2% of N_k positions of the query, over the share of
  the allowed keys that lie there (what uniform weights would give). Learned causal LMs put much of their
  mass on recent tokens (attnlab's small organism: 3-10x); i.i.d. Gaussian scores give about 1.0x.

A workload looks learned when its rows are peaked (entropy) and the peaks have structure: keys shared
across queries, or locality. The shuffle uses a fixed seed, so the statistics are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: a learned workload shares keys at least this much (mean over layers and heads) ...
MIN_KEY_SHARING = 3.0
#: ... and is on average this far below uniform attention's entropy
MAX_ENTROPY_RATIO = 0.9
#: ... or puts at least this much more mass near the diagonal than uniform weights
MIN_LOCALITY = 3.0
TOP_KEY_SHARE = 0.02
#: "near": within this share of N_k positions of the query
LOCAL_SHARE = 0.02


@dataclass(frozen=True)
class AttentionStats:
    """Means over the layers, batch and heads of a workload."""

    entropy_ratio: float
    key_sharing: float
    locality: float = 1.0

    @property
    def learned(self) -> bool:
        structured = self.key_sharing >= MIN_KEY_SHARING or self.locality >= MIN_LOCALITY
        return structured and self.entropy_ratio <= MAX_ENTROPY_RATIO

    def describe(self) -> str:
        verdict = "learned-looking" if self.learned else "NOT learned-looking (like i.i.d. random Q/K)"
        return (
            f"key sharing {self.key_sharing:.2f}x (i.i.d. ~1-2x; needs >= {MIN_KEY_SHARING}) or locality "
            f"{self.locality:.2f}x (i.i.d. ~1x; needs >= {MIN_LOCALITY}), row entropy "
            f"{self.entropy_ratio:.2f} of log N (needs <= {MAX_ENTROPY_RATIO}): {verdict}"
        )


def _top_mass(p: Tensor, top: int) -> Tensor:
    col = p.sum(dim=-2)  # mass each key receives over all queries: (B, H, N_k)
    return col.topk(top, dim=-1).values.sum(-1) / col.sum(-1)


def head_stats(q: Tensor, k: Tensor, seed: int = 0, causal: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(entropy ratio, key sharing, locality), each (B, H), of softmax attention of q over k.

    With ``causal`` (a causal model's Q/K), row i attends keys 0..i: its entropy is measured against
    log(i + 1) and its weights are shuffled among those keys only (so the baseline keeps the causal
    skew toward early keys, which every query can see)."""
    n_k = k.shape[2]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if causal:
        allowed = allowed.tril(n_k - q.shape[2])
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    counts = allowed.sum(-1).float()
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    ratio = (entropy[..., counts > 1] / counts[counts > 1].log()).mean(-1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    keys = torch.rand(p.shape, generator=g).to(p.device).masked_fill(~allowed, 2.0)  # masked keys sort last
    perm = keys.argsort(dim=-1)  # row i: a permutation of its allowed keys, then the masked ones
    top = max(1, math.ceil(TOP_KEY_SHARE * n_k))
    sharing = _top_mass(p, top) / _top_mass(p.gather(-1, perm), top)
    rows = torch.arange(q.shape[2], device=p.device)[:, None] + (n_k - q.shape[2])  # bottom-right aligned
    cols = torch.arange(n_k, device=p.device)[None, :]
    near = ((rows - cols).abs() <= max(1, math.ceil(LOCAL_SHARE * n_k))) & allowed
    uniform_share = (near.sum(-1) / allowed.sum(-1).clamp_min(1)).mean()
    locality = (p * near).sum(-1).mean(-1) / uniform_share
    return ratio, sharing, locality


def workload_stats(
    layers: list[tuple[str, Tensor, Tensor, Tensor]], max_tokens: int = 1024, causal: bool = False
) -> AttentionStats:
    """Means of :func:`head_stats` over a workload's layers, on their first ``max_tokens`` queries and keys
    (``causal``: a causal model's attention, measured causally)."""
    n = max_tokens
    ent, share, local = zip(
        *(head_stats(q[:, :, :n], k[:, :, :n], causal=causal) for _, q, k, _ in layers), strict=True
    )
    return AttentionStats(
        float(torch.stack([e.mean() for e in ent]).mean()),
        float(torch.stack([s.mean() for s in share]).mean()),
        float(torch.stack([x.mean() for x in local]).mean()),
    )
