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
decoding. By default (``per_step=False``), as in kvpress, the choice is made once and generated tokens are
all kept. The scores cost O(N_q x N_k) per head: computed in chunks of query rows (B x G x rows x N_k
floats at a time).

**Per step** (``per_step=True``, the paper's decoding loop; state :class:`StepEvictionState`): every call
attends to its *candidates* (the first call: every token; later calls: the tokens kept by the previous
call plus the tokens appended since), then

    acc[j] += sum over the call's queries of P[:, j]    (P: softmax over the candidates, causal, fp32;
                                                         mean over the query heads of the KV group)
    seen[j] += the number of the call's queries that see token j
    rank = acc / seen if normalize else acc;   the last ``recent`` candidates rank +inf, padding -inf
    keep the ``budget`` best-ranked candidates (all of them while they fit)

so a (batch, KV head) attends to at most ``budget + N_q`` tokens per call and keeps ``budget``. This follows
the authors' code (FMInference/H2O, ``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise``):
the step's attention weights over the current cache, summed over its queries, are added to the running
score of each cached token (new tokens start at their own step's weight), then the ``hh_size`` best
scores among tokens outside the ``recent_size`` most recent are kept together with those recent tokens,
sorted by position; the authors use the unnormalised sum (``normalize=False``) with ``recent = budget // 2``
and one score per attention head (Llama-2: no GQA), where here the query heads of a KV group average their
weights (a KV head keeps one set). ``normalize=True`` (the default, kvpress's) divides by ``seen``, as
kvpress divides by the queries that saw a token. Under ``attnlab.hf.use(..., free_kv=True)`` the cache is
compacted after every decode step to the kept tokens (:mod:`attnlab.hf.kv`).

Per-step cost beside the attention: the ``torch`` backend computes the weights with one more q.k over
the gathered candidates (PyTorch, fp32) and ranks with a top-k over ``budget + N_q`` scores; the
``triton`` backend takes the weights from the attention's own scores (the decode kernel's logits and lse
over the candidates, bf16 / fp16 products with fp32 accumulation: they differ from the reference's by the
summation order, and candidates whose ranks nearly tie may be kept differently) and, when a step drops
one token, updates the scores, ranks and compacts in one launch (:mod:`attnlab.kernels.decode.evict`);
beyond the fused size limit, :mod:`attnlab.kernels.decode.logits` over the candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import Attended, Selection, torch_decode, triton_decode
from attnlab.catalog.decode import _evict
from attnlab.catalog.decode._common import (
    CAUSAL_PATTERNS,
    FUSED_LOGITS_MAX,
    KEY_MASK,
    attend_reference,
    require_causal,
    valid_keys,
)
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.eviction import EvictionState, StepEvictionState

#: Score elements per chunk of query rows (fp32: 256 MiB).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class H2OParams(Params):
    """``budget``: prompt tokens kept per (batch, KV head), recent ones included (default 4096).
    ``recent``: the last prompt tokens always kept (default 0, kvpress's; the paper uses half the budget).
    ``normalize``: divide each token's accumulated attention by the number of queries that see it (default
    True, kvpress's; False: the paper's plain sum).
    ``per_step``: evict at every call (the paper's decoding loop: ``budget`` tokens kept after each step,
    ``recent`` of them the most recent) instead of once at the first call (default False, kvpress's)."""

    method = "h2o"
    budget: int = 4096
    recent: int = 0
    normalize: bool = True
    per_step: bool = False

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("recent", minimum=0)
        self.check_bool("normalize")
        self.check_bool("per_step")
        if self.recent > self.budget:
            raise self._fail("recent", self.recent, f"at most budget={self.budget}")


def accumulated(q: Tensor, k: Tensor, scale: float, valid: Tensor | None = None) -> Tensor:
    """(B, H_kv, N_k) float32: the causal attention each token gets from every query of the call, summed over
    the queries, mean over the query heads of each KV group (chunks of query rows per KV group)."""
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
    return total


def seen_by(n_q: int, n_k: int, device: torch.device) -> Tensor:
    """(N_k,) float32: how many of a call's N_q queries (bottom-right causal) see each token."""
    t = torch.arange(n_k, device=device)
    return (n_q - (t - (n_k - n_q)).clamp(min=0)).clamp(min=0).float()


def scores(q: Tensor, k: Tensor, params: H2OParams, scale: float, valid: Tensor | None = None) -> Tensor:
    """(B, H_kv, N_k) float32 H2O scores (module docstring), in chunks of query rows per KV group."""
    n_q, n_k = q.shape[2], k.shape[2]
    total = accumulated(q, k, scale, valid)
    if params.normalize:
        total = total / seen_by(n_q, n_k, q.device).clamp(min=1)
    if params.recent:
        total[..., n_k - params.recent :] = float("inf")
    return total


def _step_state(state: Any, k: Tensor) -> StepEvictionState | None:
    if state is None:
        return None
    if not isinstance(state, StepEvictionState):
        raise InputError(
            "h2o (per_step=True): state must be the StepEvictionState of an earlier step or None, got "
            f"{type(state).__name__} (a state made with per_step=False cannot continue per step)"
        )
    try:
        state.check("h2o", k.shape[0], k.shape[1], k.shape[2])
    except ValueError as e:
        raise InputError(str(e)) from None
    return state


def _candidates(st: StepEvictionState | None, b: int, h_kv: int, n_k: int, device: torch.device) -> Tensor:
    """(B, H_kv, C) int64 sorted: what a per-step call attends to (first call: every token)."""
    if st is None:
        return torch.arange(n_k, device=device).expand(b, h_kv, -1)
    return st.candidates(n_k)


def _carried(st: StepEvictionState | None, cand: Tensor) -> tuple[Tensor, Tensor]:
    """(acc, seen) of the candidates before this call: the state's, then zeros for the new tokens."""
    if st is None:
        return torch.zeros(cand.shape, device=cand.device), torch.zeros(cand.shape, device=cand.device)
    pad = (0, cand.shape[2] - st.kept.shape[2])
    return torch.nn.functional.pad(st.score, pad), torch.nn.functional.pad(st.seen, pad)


def evict_step(
    cand: Tensor,
    acc: Tensor,
    seen: Tensor,
    params: H2OParams,
    n_k: int,
    valid: Tensor | None,
    *,
    fast: bool = False,
) -> StepEvictionState:
    """The state after a per-step call: of the candidates (B, H_kv, C) sorted positions with their
    accumulated attention ``acc`` and query counts ``seen``, the ``budget`` best-ranked (module docstring;
    all of them while C <= budget), sorted by position. ``fast``: the C - budget lowest-ranked are dropped
    (a top-k of a few plus a compaction that keeps the order, instead of a top-k of ``budget``, a sort and
    gathers); the same set unless ranks tie at the cut, where either may keep another of the tied."""
    c = cand.shape[2]
    if c > params.budget:
        rank = acc / seen.clamp(min=1) if params.normalize else acc.clone()
        if params.recent:
            rank[..., c - params.recent :] = float("inf")
        if valid is not None:
            real = valid.gather(1, cand.flatten(1)).view(cand.shape)
            rank = rank.masked_fill(~real, float("-inf"))
        if fast:
            low = (  # (one to drop, a decode step's usual case: an argmin, cheaper than top-k)
                rank.argmin(-1, keepdim=True)
                if c - params.budget == 1
                else torch.topk(rank, c - params.budget, dim=-1, largest=False, sorted=False).indices
            )
            keep = torch.ones_like(rank, dtype=torch.bool).scatter_(2, low, False)
            dest = torch.where(keep, keep.cumsum(2) - 1, params.budget)  # (dropped: one spare slot)
            cand, acc, seen = (_compact(x, dest, params.budget) for x in (cand, acc, seen))
        else:
            top = torch.topk(rank, params.budget, dim=-1, sorted=False).indices.sort(dim=-1).values
            cand, acc, seen = cand.gather(2, top), acc.gather(2, top), seen.gather(2, top)
    return StepEvictionState(cand.to(torch.int32), acc, seen, n_k)


def _compact(x: Tensor, dest: Tensor, budget: int) -> Tensor:
    """x (B, H_kv, C) moved to positions ``dest`` of a (B, H_kv, budget) row (``dest == budget``: dropped)."""
    return x.new_zeros(*x.shape[:2], budget + 1).scatter_(2, dest, x)[..., :budget]


def _step_weights(
    q: Tensor, k: Tensor, cand: Tensor, scale: float, valid: Tensor | None, fast: bool = False
) -> tuple[Tensor, Tensor]:
    """(sum over queries of the causal attention weights over the candidates, mean over each KV group's
    query heads; queries seeing each candidate), both (B, H_kv, C) float32. ``fast``: the logits from the
    Triton kernel over the candidates as an index list (the cache read once in its dtype); otherwise from
    the gathered keys in fp32."""
    n_q, d = q.shape[2], q.shape[3]
    h_kv, n_k = k.shape[1], k.shape[2]
    pos = torch.arange(n_q, device=q.device) + (n_k - n_q)
    allowed = cand[:, :, None, :] <= pos[:, None]  # (B, H_kv, N_q, C)
    if valid is not None:
        allowed = allowed & valid.gather(1, cand.flatten(1)).view(cand.shape)[:, :, None, :]
    if fast:
        return _fast_step_weights(q, k, cand, scale, valid), allowed.sum(2).float()
    kc = k.gather(2, cand[..., None].expand(-1, -1, -1, d)).float()
    s = torch.einsum("bjgrd,bjcd->bjgrc", _evict.group_rows(q, h_kv).float(), kc) * scale
    probs = torch.softmax(s.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(3).mean(2), allowed.sum(2).float()


def _fast_step_weights(q: Tensor, k: Tensor, cand: Tensor, scale: float, valid: Tensor | None) -> Tensor:
    """:func:`_step_weights`'s weights from the Triton logits of the candidates (causal and padding masked in
    the kernel; a row with no allowed candidate adds 0), in pieces of at most ``CHUNK_ELEMENTS`` logits."""
    from attnlab.kernels.decode.logits import logit_chunks

    b, h, _, _ = q.shape
    h_kv, c_n = k.shape[1], cand.shape[2]
    g = h // h_kv
    acc: Tensor | None = None
    for c in logit_chunks(q, k, scale, CHUNK_ELEMENTS, causal=True, key_mask=valid, index=cand):
        # (B, heads, rows, C); a row with no allowed candidate: NaN -> 0
        probs = torch.softmax(c.logits, dim=-1).nan_to_num_(0.0)
        part = probs.view(b, c.kv1 - c.kv0, -1, c_n).sum(2)  # (over the group's heads and the rows)
        if acc is None and c.kv1 - c.kv0 == h_kv:  # (the first piece of rows over every head)
            acc = part
        else:
            if acc is None:
                acc = torch.zeros(b, h_kv, c_n, device=q.device)
            acc[:, c.kv0 : c.kv1] += part
    if acc is None:  # (no query rows)
        return torch.zeros(b, h_kv, c_n, device=q.device)
    return acc / g


def _first_weights(q: Tensor, k: Tensor, scale: float, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """A per-step first call: every token is a candidate (chunked over query rows: a prefill may vote)."""
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    seen = seen_by(q.shape[2], n_k, q.device).expand(b, h_kv, -1)
    if valid is not None:
        seen = seen * valid[:, None]
    return accumulated(q, k, scale, valid), seen


def _reference_step(
    q: Tensor, k: Tensor, v: Tensor, params: H2OParams, scale: float, upcast: bool, state: Any,
    key_mask: Tensor | None,
) -> tuple[Tensor, StepEvictionState]:  # fmt: skip
    """Per-step reference: dense attention masked to the candidates; the weights from dense fp32 scores
    over every cache token, masked to the candidates, then gathered."""
    st = _step_state(state, k)
    b, n_q = q.shape[0], q.shape[2]
    h_kv, n_k = k.shape[1], k.shape[2]
    cand = _candidates(st, b, h_kv, n_k, q.device)
    token_mask = torch.zeros(b, h_kv, n_k, dtype=torch.bool, device=q.device).scatter_(2, cand, True)
    out = attend_reference(q, k, v, token_mask, scale=scale, upcast=upcast, key_mask=key_mask)
    valid = valid_keys(key_mask)
    logits = torch.einsum("bjgrd,bjnd->bjgrn", _evict.group_rows(q, h_kv).float(), k.float()) * scale
    pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
    allowed = token_mask[:, :, None, :] & (torch.arange(n_k, device=q.device) <= pos)  # (B, H_kv, N_q, N_k)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed[:, :, None], float("-inf")), -1).nan_to_num(0.0)
    acc, seen = _carried(st, cand)
    acc = acc + probs.sum(3).mean(2).gather(2, cand)
    seen = seen + allowed.sum(2).float().gather(2, cand)
    return out, evict_step(cand, acc, seen, params, n_k, valid)


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
) -> tuple[Tensor, EvictionState | StepEvictionState]:
    """First call (``state=None``): exact causal attention (fp32 when ``upcast``) and the H2O choice of
    ``budget`` tokens per (batch, KV head) by :func:`scores`. Later calls: causal attention over the kept
    tokens and the tokens appended since the first call. With ``per_step``: every call attends to the
    previous call's kept tokens and those appended since, and keeps ``budget`` of them (module docstring)."""
    if params.per_step:
        require_causal("h2o", causal)
        return _reference_step(q, k, v, params, scale, upcast, state, key_mask)
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


_select_once = _evict.selector("h2o", scores)


def _select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | Attended | None, EvictionState | StepEvictionState]:
    """The selector: kvpress's one decision, or (``per_step``) this call's candidates and the kept set
    after it (the candidates are every token while nothing was evicted: exact attention). ``fast``, per
    step, once something was evicted: the attention over the candidates and its weights in one pass (the
    decode kernel's logits and lse, :func:`attnlab.kernels.decode.op.decode_attention_logits`) and the
    compacting eviction of :func:`evict_step` (one token to drop, a decode step's usual case: the whole
    update in one Triton launch, :func:`attnlab.kernels.decode.evict.h2o_evict_one`), when the logits fit
    ``FUSED_LOGITS_MAX`` floats."""
    params = call.params
    assert isinstance(params, H2OParams)
    if not params.per_step:
        return _select_once(q, k, v, call, extra, state, fast)
    st = _step_state(state, k)
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    valid = valid_keys(extra.get("key_mask"))
    n_cand = n_k if st is None else int(st.kept.shape[2]) + n_k - st.length
    if (
        fast
        and st is not None
        and not st.complete()
        and b * q.shape[1] * q.shape[2] * n_cand <= FUSED_LOGITS_MAX
    ):
        # the attention over the candidates and its weights in one pass (the decode kernel's own logits)
        from attnlab.kernels.decode.op import decode_attention_logits

        new = torch.arange(st.length, n_k, device=q.device, dtype=torch.int32).expand(b, h_kv, -1)
        cand32 = torch.cat([st.kept.to(torch.int32), new], dim=2)  # (int32 from the start: one copy)
        out, lse, logits = decode_attention_logits(
            q, k, v, cand32, None, 1, call.scale, True, extra.get("key_mask")
        )
        if n_cand - params.budget == 1 and st.kept.shape[2] == params.budget:  # (one to drop)
            from attnlab.kernels.decode.evict import h2o_evict_one

            kept, score, seen = h2o_evict_one(
                logits, lse, cand32, st.score, st.seen, extra.get("key_mask"),
                recent=params.recent, normalize=params.normalize,
            )  # fmt: skip
            return Attended(out), StepEvictionState(kept, score, seen, n_k)
        cand = cand32.long()
        w = torch.exp(logits - lse[..., None]).nan_to_num_(0.0).sum(2).unflatten(1, (h_kv, -1)).mean(2)
        n = torch.isfinite(logits.unflatten(1, (h_kv, -1))[:, :, 0]).sum(2).float()  # queries seeing each
        acc, seen = _carried(st, cand)
        return Attended(out), evict_step(cand, acc + w, seen + n, params, n_k, valid, fast=True)
    cand = _candidates(st, b, h_kv, n_k, q.device)
    if st is None:
        acc, seen = _first_weights(q, k, call.scale, valid)
    else:  # (nothing evicted yet: every token is a candidate, read in place rather than gathered)
        acc, seen = _carried(st, cand)
        w, n = (
            _first_weights(q, k, call.scale, valid)
            if st.complete()
            else _step_weights(q, k, cand, call.scale, valid, fast)
        )
        acc, seen = acc + w, seen + n
    sel = None if st is None or st.complete() else Selection(cand.to(torch.int32), 1)
    return sel, evict_step(cand, acc, seen, params, n_k, valid)


SPEC = MethodSpec(
    name="h2o",
    family="decode",
    paper="H2O (Zhang et al., 2023); kvpress ObservedAttentionPress",
    summary="decode: evict the prompt's cache to a budget by accumulated attention (heavy hitters)",
    param_class=H2OParams,
    reference=reference,
    backends=(triton_decode(_select), torch_decode(_select)),
    patterns=CAUSAL_PATTERNS,
    test_params=(
        {"budget": 12},
        {"budget": 16, "recent": 6, "normalize": False},
        {"budget": 12, "recent": 4, "per_step": True},
    ),
    bench_params=lambda n: [{"budget": 4096}, {"budget": 1024}],
    inputs=(KEY_MASK,),
    stateful=True,
)
