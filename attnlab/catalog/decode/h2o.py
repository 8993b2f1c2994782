"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023) eviction, as kvpress's ``ObservedAttentionPress`` scores it.

Scores (per batch and KV head, once, at the first call; fp32)::

    P = softmax(scale * q k^T) over every key, bottom-right causal, for every query of the call
    s[j] = sum over queries of P[:, j]                       (the attention token j accumulated)
    normalize: s[j] /= the number of the call's queries that see token j   (kvpress: N_k - j at prefill)
    score = mean of s over the query heads of the KV group; the last ``recent`` tokens score +inf

then the ``budget`` highest-scored tokens are kept (shared machinery and state: ``_evict``): the first
call runs exact attention, later calls attend to the kept prompt tokens and every token appended since.

Conventions of other code: kvpress's press (``observed_attention_press.py``) needs eager attention with
``output_attentions``; it normalises by the number of queries (``normalize=True``, the default here) and
keeps no recent window (``recent=0``). The H2O paper accumulates unnormalised scores and splits its budget
between heavy hitters and recent tokens (``normalize=False, recent=budget // 2``), and also evicts during
decoding; here, as in kvpress, the choice is made once and generated tokens are all kept. The scores cost
O(N_q x N_k) per head: computed in chunks of query rows (B x G x rows x N_k floats at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import torch_decode, triton_decode
from attnlab.catalog.decode import _evict
from attnlab.catalog.decode._common import CAUSAL_PATTERNS, KEY_MASK
from attnlab.core import MethodSpec
from attnlab.params import Params
from attnlab.state.eviction import EvictionState

#: Score elements per chunk of query rows (fp32: 256 MiB).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class H2OParams(Params):
    """``budget``: prompt tokens kept per (batch, KV head), recent ones included (default 4096).
    ``recent``: the last prompt tokens always kept (default 0, kvpress's; the paper uses half the budget).
    ``normalize``: divide each token's accumulated attention by the number of queries that see it (default
    True, kvpress's; False: the paper's plain sum)."""

    method = "h2o"
    budget: int = 4096
    recent: int = 0
    normalize: bool = True

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("recent", minimum=0)
        self.check_bool("normalize")
        if self.recent > self.budget:
            raise self._fail("recent", self.recent, f"at most budget={self.budget}")


def scores(q: Tensor, k: Tensor, params: H2OParams, scale: float, valid: Tensor | None = None) -> Tensor:
    """(B, H_kv, N_k) float32 H2O scores (module docstring), in chunks of query rows per KV group."""
    b, h, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    g = h // h_kv
    qg = _evict.group_rows(q, h_kv)
    rows = max(1, CHUNK_ELEMENTS // (b * g * n_k))
    total = torch.zeros(b, h_kv, n_k, device=q.device)
    for j in range(h_kv):
        for r0 in range(0, n_q, rows):
            probs = _evict.causal_probs(qg[:, j, :, r0 : r0 + rows], k[:, j], scale, r0, n_q, valid)
            total[:, j] += probs.sum(2).mean(1)
    if params.normalize:
        t = torch.arange(n_k, device=q.device)
        seen_by = (n_q - (t - (n_k - n_q)).clamp(min=0)).clamp(min=1)
        total = total / seen_by
    if params.recent:
        total[..., n_k - params.recent :] = float("inf")
    return total


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: H2OParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, EvictionState]:
    """First call (``state=None``): exact causal attention (fp32 when ``upcast``) and the H2O choice of
    ``budget`` tokens per (batch, KV head) by :func:`scores`. Later calls: causal attention over the kept
    tokens and the tokens appended since the first call."""
    return _evict.reference(
        "h2o",
        scores,
        q,
        k,
        v,
        params,
        causal=causal,
        scale=scale,
        upcast=upcast,
        state=state,
        key_mask=key_mask,
    )


_select = _evict.selector("h2o", scores)


SPEC = MethodSpec(
    name="h2o",
    family="decode",
    paper="H2O (Zhang et al., 2023); kvpress ObservedAttentionPress",
    summary="decode: evict the prompt's cache to a budget by accumulated attention (heavy hitters)",
    param_class=H2OParams,
    reference=reference,
    backends=(triton_decode(_select), torch_decode(_select)),
    patterns=CAUSAL_PATTERNS,
    test_params=({"budget": 12}, {"budget": 16, "recent": 6, "normalize": False}),
    bench_params=lambda n: [{"budget": 4096}, {"budget": 1024}],
    inputs=(KEY_MASK,),
    stateful=True,
)
