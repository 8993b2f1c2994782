"""Is a workload's attention learned, or what i.i.d. random Q/K would give? Two statistics of the dense,
non-causal softmax attention ``P = softmax(q k^T / sqrt(D))`` per head, and a verdict.

- ``entropy_ratio``: mean over query rows of H(P_i) / log N_k (1.0: uniform attention).
- ``key_sharing``: how much more attention mass the most-attended 2% of keys receive (summed over all
  queries) than they would if each query's weights were shuffled over the keys independently. Learned
  heads share favourite keys across queries (sinks, separators, salient tokens): MiniLM's layers measure
  about 2-7x. Row-independent i.i.d. Gaussian scores cannot share keys: about 1.0-2.0x at any scale of Q/K,
  even when each row is peaked.

The shuffle uses a fixed seed, so the statistics are reproducible.
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
TOP_KEY_SHARE = 0.02


@dataclass(frozen=True)
class AttentionStats:
    """Means over the layers, batch and heads of a workload."""

    entropy_ratio: float
    key_sharing: float

    @property
    def learned(self) -> bool:
        return self.key_sharing >= MIN_KEY_SHARING and self.entropy_ratio <= MAX_ENTROPY_RATIO

    def describe(self) -> str:
        verdict = "learned-looking" if self.learned else "NOT learned-looking (like i.i.d. random Q/K)"
        return (
            f"key sharing {self.key_sharing:.2f}x (i.i.d. ~1-2x; needs >= {MIN_KEY_SHARING}), "
            f"row entropy {self.entropy_ratio:.2f} of log N (needs <= {MAX_ENTROPY_RATIO}): {verdict}"
        )


def _top_mass(p: Tensor, top: int) -> Tensor:
    col = p.sum(dim=-2)  # mass each key receives over all queries: (B, H, N_k)
    return col.topk(top, dim=-1).values.sum(-1) / col.sum(-1)


def head_stats(q: Tensor, k: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(entropy ratio, key sharing), each (B, H), of non-causal softmax attention of q over k."""
    n_k = k.shape[2]
    p = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.rand(p.shape, generator=g).argsort(dim=-1).to(p.device)
    top = max(1, math.ceil(TOP_KEY_SHARE * n_k))
    sharing = _top_mass(p, top) / _top_mass(p.gather(-1, perm), top)
    return entropy / math.log(n_k), sharing


def workload_stats(
    layers: list[tuple[str, Tensor, Tensor, Tensor]], max_tokens: int = 1024
) -> AttentionStats:
    """Means of :func:`head_stats` over a workload's layers, on their first ``max_tokens`` queries and keys."""
    n = max_tokens
    ent, share = zip(*(head_stats(q[:, :, :n], k[:, :, :n]) for _, q, k, _ in layers), strict=True)
    return AttentionStats(
        float(torch.stack([e.mean() for e in ent]).mean()),
        float(torch.stack([s.mean() for s in share]).mean()),
    )
