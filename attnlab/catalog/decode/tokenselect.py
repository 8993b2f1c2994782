"""``tokenselect``: TokenSelect (Wu et al., 2024): per-head q . k criticality, soft-voted across the heads of a
KV group, with a selection cache that is reused while consecutive queries stay similar.

Selection (per batch and KV group)::

    qf[h] = mean of the call's queries of head h (the query fingerprint)
    candidates: tokens [n_init, N_k - n_local)
    c[h, t] = softmax over candidates of qf[h] . k[t]        (no 1/sqrt(D), as TokenSelect)
    vote[t] = sum over the group's query heads h of c[h, t]  (soft voting)
    kept = [0, n_init)  +  the budget - n_init - n_local candidates with the highest vote  +  [N_k - n_local, N_k)

Selection cache: when every batch element's fingerprint has cosine similarity > ``threshold`` with the
previous call's (all heads' fingerprints as one vector), the previous call's voted tokens are reused (minus
those that the local window now covers) with the current sinks and local window; otherwise a new vote.
Budget in tokens (sinks and local window included); a budget >= N_k runs exact attention and votes nothing,
so the first call past the budget always votes (a selection is reused only when it holds the
``budget - n_init - n_local`` votes the call takes).

Queries per call: a call that selects (budget < N_k) takes N_q <= ``n_local`` queries (decoding: 1 to a
few), so that the local window holds every query's own token (query ``i`` sits at position
``N_k - N_q + i``); more (a prefill: its first rows would see only the sinks and the voted tokens before
them, or nothing) are refused with an InputError. A call with budget >= N_k is exact for any N_q.

Conventions of other code: pzs19/TokenSelect (``patcher/token_retrieval.py``) shares one selection across
all heads of a layer (summing the per-head softmaxes over every head; its kernel maps query head h to KV
head h % H_kv, unlike the usual h // G) and caches keys without RoPE; here the vote is per KV group (so a
group reads its K/V once) over the cache as given. Its selection cache is switched off in the released code
(``QUERY_CACHE=False``); the paper's threshold (0.9) is the default here. Llama-3 config there: n_init 128,
n_local 512, top_k 2048 (budget 2688 here); the defaults here keep n_init and n_local and use budget 4096.

Votes: the reference (and the ``torch`` backend) computes qf . k in fp32 from an fp32 copy of K; the
``triton`` backend reads the cache once in its own dtype (:mod:`attnlab.kernels.decode.logits`: the fp32
fingerprint split into two bf16 halves against the bf16 keys as loaded, about fp32's precision; fp32
accumulation), so the votes differ from the reference's by rounding, and candidates whose
votes nearly tie may rank differently.

The reuse decision reads one boolean from the device (a host synchronisation) per call; ``threshold=1``
never reuses and never synchronises (a step can then be captured in a CUDA graph).

State: :class:`attnlab.state.reuse.TokenSet` (voted positions, the cache length then, the fingerprint).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import Selection, torch_decode, triton_decode
from attnlab.catalog.decode._common import (
    CAUSAL_PATTERNS,
    KEY_MASK,
    attend_reference,
    first_real,
    require_causal,
    valid_keys,
)
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.reuse import TokenSet

#: The method's name, which its states carry (:class:`attnlab.state.reuse.TokenSet`).
METHOD = "tokenselect"
#: Vote logits per piece of KV heads (fp32: 256 MiB; the Triton path).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class TokenSelectParams(Params):
    """``budget``: tokens attended per (batch, KV head), sinks and local window included (default 4096).
    ``n_init``: leading tokens always kept (default 128). ``n_local``: most recent tokens always kept
    (default 512). ``threshold``: reuse the previous selection while the query fingerprints' cosine
    similarity exceeds it, in [0, 1] (default 0.9; 1 = never reuse)."""

    method = "tokenselect"
    budget: int = 4096
    n_init: int = 128
    n_local: int = 512
    threshold: float = 0.9

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("n_init", minimum=0)
        self.check_int("n_local", minimum=1)
        self.check_float("threshold")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise self._fail("threshold", self.threshold, "a cosine similarity in [0, 1] (1 = never reuse)")
        if self.n_init + self.n_local > self.budget:
            raise self._fail(
                "budget",
                self.budget,
                f">= n_init + n_local = {self.n_init + self.n_local} (they are part of it)",
            )

    def check_lengths(self, n_q: int, n_k: int) -> None:
        check_queries(self, n_q, n_k)


def check_queries(p: TokenSelectParams, n_q: int, n_k: int) -> None:
    """Raise InputError when a selecting call (budget < N_k) has more queries than the local window
    (module docstring: queries per call)."""
    if p.budget < n_k and n_q > p.n_local:
        raise InputError(
            f"tokenselect: N_q={n_q} queries over a {n_k}-token cache with budget={p.budget} < N_k; expected "
            f"N_q <= n_local={p.n_local}, so that every query sees its own token (the local window holds the "
            "call's queries): run a prefill with a prefill method, or in chunks of at most n_local queries"
        )


def fingerprint(q: Tensor) -> Tensor:
    """(B, H, D) float32: the mean of each head's queries."""
    return q.float().mean(2)


def votes(
    qf: Tensor, k: Tensor, lo: int, hi: int, allowed: Tensor | None = None, *, fast: bool = False
) -> Tensor:
    """(B, H_kv, hi - lo) float32: per-head softmax over candidates [lo, hi) of qf . k, summed over each
    group's heads; ``allowed`` (B, hi - lo) bool leaves candidates out (their vote is -1). ``fast``: the
    products from the Triton logits (:func:`attnlab.kernels.decode.logits.group_logits`: the cache read
    once in its dtype)."""
    if fast:
        return _fast_votes(qf, k, lo, hi, allowed)
    b, h, d = qf.shape
    h_kv = k.shape[1]
    s = torch.einsum("bkgd,bknd->bkgn", qf.view(b, h_kv, h // h_kv, d), k[:, :, lo:hi].float())
    if allowed is None:
        return torch.softmax(s, dim=-1).sum(2)
    s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
    vote = torch.softmax(s, dim=-1).nan_to_num(0.0).sum(2)
    return vote.masked_fill(~allowed[:, None, :], -1.0)


def _fast_votes(qf: Tensor, k: Tensor, lo: int, hi: int, allowed: Tensor | None) -> Tensor:
    """:func:`votes` from the Triton logits of the fingerprints (one query row per head, no scale, not
    causal; the candidates left out masked in the kernel), in pieces of at most ``CHUNK_ELEMENTS`` logits
    (KV heads)."""
    from attnlab.kernels.decode.logits import logit_chunks

    b = qf.shape[0]
    h_kv, n_k = k.shape[1], k.shape[2]
    key_mask = None
    if allowed is not None:  # (B, N_k): the kernel's padding mask, True on the allowed candidates
        key_mask = torch.zeros(b, n_k, dtype=torch.bool, device=k.device)
        key_mask[:, lo:hi] = allowed
    vote: Tensor | None = None
    for c in logit_chunks(
        qf[:, :, None], k, 1.0, CHUNK_ELEMENTS, causal=False, key_mask=key_mask, lo=lo, hi=hi
    ):
        # (a row with no allowed candidate gives NaN here: every head of its batch element has none, and
        # its votes become -1 below)
        # softmax over the candidates (B, heads, 1, hi - lo) as max, exp, sum: torch's softmax kernel runs
        # one block per row, slow on a few long rows (32 rows of 128K: ~100 us on the H100)
        top = c.logits.amax(-1, keepdim=True)
        e = torch.exp(c.logits - torch.where(torch.isfinite(top), top, 0.0))
        part = (e / e.sum(-1, keepdim=True)).view(b, c.kv1 - c.kv0, -1, hi - lo).sum(2)
        if vote is None and c.kv1 - c.kv0 == h_kv:  # (one piece: no other buffer)
            vote = part
        else:
            if vote is None:
                vote = torch.empty(b, h_kv, hi - lo, device=k.device)
            vote[:, c.kv0 : c.kv1] = part
    if vote is None:  # (no heads)
        vote = torch.zeros(b, h_kv, hi - lo, device=k.device)
    return vote if allowed is None else vote.masked_fill(~allowed[:, None, :], -1.0)


def similar(qf: Tensor, prev: Tensor | None, threshold: float) -> bool:
    """Whether every batch element's fingerprint (all heads as one vector) has cosine > threshold with the
    previous one (a host synchronisation; False without a previous one or with threshold 1)."""
    if prev is None or threshold >= 1.0 or prev.shape != qf.shape:
        return False
    cos = torch.nn.functional.cosine_similarity(qf.flatten(1), prev.flatten(1), dim=1)
    return bool((cos > threshold).all())


def choose(
    q: Tensor,
    k: Tensor,
    p: TokenSelectParams,
    state: TokenSet | None,
    key_mask: Tensor | None = None,
    *,
    fast: bool = False,
) -> tuple[Tensor | None, TokenSet]:
    """(index (B, H_kv, n) int32 of the step's tokens, or None for exact attention; the new state).
    With ``key_mask`` the sinks start at each sequence's first real token, padding is no candidate, and
    list entries that would repeat a token or name padding are holes (-1). ``fast``: the votes from the
    Triton logits (:func:`votes`)."""
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    check_queries(p, q.shape[2], n_k)
    qf = fingerprint(q)
    dev = k.device
    if p.budget >= n_k:  # (no vote: a later step past the budget votes anew, see below)
        empty = torch.empty(b, h_kv, 0, dtype=torch.int32, device=dev)
        return None, TokenSet(empty, n_k, 0, qf, method=METHOD)
    lo, hi = p.n_init, n_k - p.n_local
    top = min(p.budget - p.n_init - p.n_local, hi - lo)
    # a selection is reused only when it holds the votes this step takes: not one made under the exact
    # fallback (no votes) or with another budget (a shape, no host synchronisation)
    if state is not None and state.positions.shape[2] == top and similar(qf, state.query, p.threshold):
        voted = state.positions
        voted = torch.where(voted >= hi, torch.full_like(voted, -1), voted)  # now in the local window
        new_state = TokenSet(state.positions, state.n_k, state.step + 1, qf, method=METHOD)
    else:
        valid = valid_keys(key_mask)
        if valid is None:
            picked = torch.topk(votes(qf, k, lo, hi, fast=fast), top, dim=-1, sorted=False).indices + lo
        else:
            first = first_real(valid, b, dev)[:, None]
            t = torch.arange(lo, hi, device=dev)
            allowed = valid[:, lo:hi] & (t >= first + p.n_init)
            top_ = torch.topk(votes(qf, k, lo, hi, allowed, fast=fast), top, dim=-1, sorted=False).indices
            ok = allowed[:, None, :].expand(-1, h_kv, -1).gather(2, top_)
            picked = torch.where(ok, top_ + lo, -1)
        voted = picked.to(torch.int32)
        new_state = TokenSet(voted, n_k, 0, qf, method=METHOD)
    first_tok = first_real(valid_keys(key_mask), b, dev)[:, None]
    sinks = first_tok + torch.arange(lo, device=dev)
    sinks = torch.where(sinks < hi, sinks, -1)  # (already in the local window: not twice)
    local = torch.arange(hi, n_k, device=dev).expand(b, -1)
    fixed = torch.cat([sinks, local], dim=1).to(torch.int32)[:, None].expand(b, h_kv, -1)
    if key_mask is not None:  # a voted token among the sinks (reused across a changed start): not twice
        voted = torch.where((voted >= first_tok[:, None]) & (voted < first_tok[:, None] + lo), -1, voted)
    return torch.cat([fixed, voted], dim=2), new_state


def _state(state: Any, k: Tensor) -> TokenSet | None:
    if state is None:
        return None
    if not isinstance(state, TokenSet):
        raise InputError(
            f"tokenselect: state must be the TokenSet of an earlier step or None, got {type(state).__name__}"
        )
    try:
        state.check("tokenselect", k.shape[0], k.shape[1], k.shape[2])
    except ValueError as e:
        raise InputError(str(e)) from None
    return state


def select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | None, TokenSet]:
    """The step's tokens (module docstring) as a token list, and the new state."""
    index, new_state = choose(q, k, call.params, _state(state, k), extra.get("key_mask"), fast=fast)  # type: ignore[arg-type]
    return (None if index is None else Selection(index, 1)), new_state


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: TokenSelectParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, TokenSet]:
    """Causal softmax attention (fp32 when ``upcast``) over the real tokens :func:`choose` keeps (sinks,
    voted tokens, local window; every token when budget >= N_k)."""
    require_causal("tokenselect", causal)
    index, new_state = choose(q, k, params, _state(state, k), key_mask)
    if index is None:
        return attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask), new_state
    mask = torch.zeros(k.shape[0], k.shape[1], k.shape[2] + 1, dtype=torch.bool, device=k.device)
    mask.scatter_(2, torch.where(index >= 0, index, k.shape[2]).long(), True)
    return attend_reference(q, k, v, mask[..., :-1], scale=scale, upcast=upcast, key_mask=key_mask), new_state


SPEC = MethodSpec(
    name="tokenselect",
    family="decode",
    paper="TokenSelect (Wu et al., 2024)",
    summary="decode: per-head q.k criticality soft-voted over the KV group, selection reused while queries stay similar",
    param_class=TokenSelectParams,
    reference=reference,
    backends=(triton_decode(select), torch_decode(select)),
    patterns=CAUSAL_PATTERNS,
    test_params=(  # (the first set exact on the CPU parity's 16 x 16 self case: see queries per call)
        {"budget": 16, "n_init": 2, "n_local": 4},
        {"budget": 10, "n_init": 0, "n_local": 3, "threshold": 1.0},
    ),
    bench_params=lambda n: [{"budget": 4096}],
    inputs=(KEY_MASK,),
    stateful=True,
)
