"""What the eviction policies (``snapkv``, ``h2o``) share: decide once from scores, then keep the choice.

First call (``state=None``): exact causal attention (the prompt's own attention is not compressed: kvpress
compresses the cache after the prefill's forward), and the policy's scores (B, H_kv, N_k) pick the
``budget`` tokens each (batch, KV head) keeps (top-k, sorted; ties broken by ``torch.topk``). Later calls:
attention over the kept tokens plus every token appended since. Budget in tokens; a budget >= the prompt
length keeps everything (exact attention throughout). Padding (``key_mask``) gets no attention in the
scores and is never kept.

KV memory: a call here only masks (the cache passed in keeps every token); :meth:`EvictionState.kept_tokens`
is what an evicting cache would hold. Under Hugging Face transformers, ``attnlab.hf.use(..., free_kv=True)``
removes the dropped tokens from the cache after the decision (:mod:`attnlab.hf.kv`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import Selection
from attnlab.catalog.decode._common import attend_reference, require_causal, valid_keys
from attnlab.core import Call
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.eviction import EvictionState

#: ``scores(q, k, params, scale, valid) -> (B, H_kv, N_k) float32``: higher = keep; ``valid`` (B, N_k) bool
#: marks real tokens (None: all), padding gets no attention in the scores
Scorer = Callable[[Tensor, Tensor, Any, float, Tensor | None], Tensor]


def _state(method: str, state: Any, k: Tensor) -> EvictionState | None:
    if state is None:
        return None
    if not isinstance(state, EvictionState):
        raise InputError(
            f"{method}: state must be the EvictionState of an earlier step or None, got {type(state).__name__}"
        )
    try:
        state.check(method, k.shape[0], k.shape[1], k.shape[2])
    except ValueError as e:
        raise InputError(str(e)) from None
    return state


def decide(
    q: Tensor, k: Tensor, params: Any, scale: float, scorer: Scorer, valid: Tensor | None = None
) -> EvictionState:
    """The state of a first call: the ``params.budget`` highest-scored tokens (sorted; padding last), or all
    of them."""
    n_k = k.shape[2]
    if params.budget >= n_k:
        return EvictionState(None, n_k)
    scores = scorer(q, k, params, scale, valid)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None], float("-inf"))
    kept = torch.topk(scores, params.budget, dim=-1, sorted=False).indices
    return EvictionState(kept.sort(dim=-1).values.to(torch.int32), n_k)


def selector(method: str, scorer: Scorer) -> Callable[..., tuple[Selection | None, EvictionState]]:
    """The method's selector: decide at the first call (exact attention there), then the kept tokens."""

    def select(
        q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
    ) -> tuple[Selection | None, EvictionState]:
        st = _state(method, state, k)
        if st is None:
            return None, decide(q, k, call.params, call.scale, scorer, valid_keys(extra.get("key_mask")))
        index = st.index(k.shape[2])
        return (None if index is None else Selection(index, 1)), st

    return select


def reference(
    method: str,
    scorer: Scorer,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: Params,
    *,
    causal: bool,
    scale: float,
    upcast: bool,
    state: Any,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, EvictionState]:
    """Exact attention and the decision at the first call; attention over kept + appended tokens after;
    padding (``key_mask`` <= 0) never attended nor kept."""
    require_causal(method, causal)
    st = _state(method, state, k)
    if st is None:
        out = attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask)
        return out, decide(q, k, params, scale, scorer, valid_keys(key_mask))
    n_k = k.shape[2]
    mask = None
    if st.kept is not None:
        mask = torch.zeros(k.shape[0], k.shape[1], n_k, dtype=torch.bool, device=k.device)
        mask.scatter_(2, st.kept.long(), True)
        mask[..., st.prefix :] = True
    return attend_reference(q, k, v, mask, scale=scale, upcast=upcast, key_mask=key_mask), st


def group_rows(q: Tensor, h_kv: int) -> Tensor:
    """q (B, H, N_q, D) as (B, H_kv, G, N_q, D) (query head h = kv * G + g)."""
    b, h, n_q, d = q.shape
    return q.reshape(b, h_kv, h // h_kv, n_q, d)


def causal_probs(
    qg: Tensor, kh: Tensor, scale: float, first_row: int, n_q: int, valid: Tensor | None = None
) -> Tensor:
    """fp32 softmax probabilities (B, G, rows, N_k) of query rows ``first_row ..`` (of N_q, bottom-right
    causal) of one KV group qg (B, G, rows, D) against its keys kh (B, N_k, D); padding (``valid`` (B, N_k)
    False) gets none."""
    n_k = kh.shape[1]
    s = torch.einsum("bgrd,bnd->bgrn", qg.float(), kh.float()) * scale
    pos = torch.arange(first_row, first_row + qg.shape[2], device=qg.device)[:, None] + (n_k - n_q)
    s = s.masked_fill(torch.arange(n_k, device=qg.device)[None, :] > pos, float("-inf"))
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)
