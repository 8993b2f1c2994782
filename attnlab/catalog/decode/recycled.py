"""``recycled``: Recycled Attention (Xu et al., 2024, v1): full attention every ``stride`` steps, and in
between attention over the top-k tokens of the last full step.

Schedule and selection (per batch and KV head)::

    a call with state=None, or whose state.step is a multiple of ``stride``, is a full step:
        exact causal attention over the whole cache, and
        P = softmax(scale * q k^T) (bottom-right causal), max over the group's query heads and the call's
        queries; P = max_pool1d(P, ``pool``, stride 1, padding pool // 2) over key positions;
        keep the ``budget`` tokens with the highest pooled P (sorted on the torch path; in top-k order on
        the triton path, whose decode kernel reads a list in any order)
    other calls: attention over the kept tokens and every token appended since the last full step

Budget in tokens; a budget >= N_k keeps everything (that step is exact anyway).

Conventions of other code: the paper (arXiv 2411.05787; no released code, see the literature card) builds
the recycled cache from the last prompt token's attention, max-pooled with kernel 7, max over the heads of
a GQA group; between refreshes it appends each new token and evicts the lowest-scored one to keep K
tokens. Here the tokens appended since the last full step are all kept (at most ``stride - 1`` more than
the budget), so no score needs updating between full steps. v2 (RefreshKV) refreshes when the query
drifts; this is v1's fixed stride. Full steps cost one dense attention plus the scores; they are the
method's cost.

Scores: the reference (and the ``torch`` backend) computes P in fp32 from fp32 copies of q and K. The
``triton`` backend attends and scores in one pass: the decode kernel over every token stores its logits,
and P = exp(logit - lse) with the kernel's lse (bf16 / fp16 products on the tensor cores, fp32
accumulation; a row with no allowed key: 0); one kernel makes the pooled scores from those logits
(:mod:`attnlab.kernels.decode.recycled_scores`: read once, the group maximum, exp, pooling and padding in
one launch); beyond the fused size limit, exact attention and then the
logits of :mod:`attnlab.kernels.decode.logits` with an fp32 softmax. Either way P differs from the
reference's by the summation order of the logits, and tokens whose pooled P nearly tie may rank
differently.

State: :class:`attnlab.state.reuse.TokenSet` (kept positions, cache length at the full step, steps since).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.backends.decode_select import Attended, Selection, torch_decode, triton_decode
from attnlab.catalog.decode._common import (
    CAUSAL_PATTERNS,
    KEY_MASK,
    attend_reference,
    attend_with_logits,
    require_causal,
    valid_keys,
)
from attnlab.catalog.decode._evict import causal_probs, group_rows
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.reuse import TokenSet

#: The method's name, which its states carry (:class:`attnlab.state.reuse.TokenSet`).
METHOD = "recycled"
#: Score elements per chunk of query rows (fp32: 256 MiB).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class RecycledParams(Params):
    """``budget``: tokens kept from each full step per (batch, KV head) (default 4096). ``stride``: a full
    step every ``stride`` calls (default 10; 1 = always full). ``pool``: odd width of the max pooling of
    the full step's attention over key positions (default 7, the paper's; 1 = none)."""

    method = "recycled"
    budget: int = 4096
    stride: int = 10
    pool: int = 7

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("stride", minimum=1)
        self.check_int("pool", minimum=1)
        if self.pool % 2 == 0:
            raise self._fail("pool", self.pool, "an odd width")


def keep_scores(
    q: Tensor,
    k: Tensor,
    params: RecycledParams,
    scale: float,
    valid: Tensor | None = None,
    *,
    fast: bool = False,
) -> Tensor:
    """(B, H_kv, N_k) float32: the full step's attention, max over the group's heads and queries, pooled;
    padding (``valid`` False) gets no attention and scores -inf. ``fast``: from the Triton logits
    (:func:`attnlab.kernels.decode.logits.group_logits`: the cache read once in its dtype)."""
    if fast:
        out = _fast_attention_max(q, k, scale, valid)
    else:
        b, _, n_q, _ = q.shape
        h_kv, n_k = k.shape[1], k.shape[2]
        qg = group_rows(q, h_kv)
        rows = max(1, CHUNK_ELEMENTS // (b * qg.shape[2] * n_k))
        out = torch.zeros(b, h_kv, n_k, device=q.device)
        for j in range(h_kv):
            for r0 in range(0, n_q, rows):
                probs = causal_probs(
                    qg[:, j, :, r0 : r0 + rows], k[:, j], scale, r0, n_q, valid
                )  # (B, G, rows, N_k)
                out[:, j] = torch.maximum(out[:, j], probs.amax(dim=(1, 2)))
    return _pooled(out, params, valid)


def _pooled(best: Tensor, params: RecycledParams, valid: Tensor | None) -> Tensor:
    """The attention maxima (B, H_kv, N_k) max-pooled over key positions, padding -inf."""
    if params.pool > 1:
        best = F.max_pool1d(best, params.pool, stride=1, padding=params.pool // 2)
    if valid is not None:
        best = best.masked_fill(~valid[:, None], float("-inf"))
    return best


def _keep(scores: Tensor, params: RecycledParams, n_k: int, *, ordered: bool = True) -> TokenSet:
    """The ``budget`` highest-scored tokens as a full step's kept set, sorted (``ordered``) or in top-k
    order (the fused fast path: the decode kernel reads them in any order, and a sort of B x H_kv rows of
    thousands took ~35 us of a full step at B=1 on the H100)."""
    top = torch.topk(scores, params.budget, dim=-1, sorted=False).indices
    return TokenSet((top.sort(dim=-1).values if ordered else top).to(torch.int32), n_k, 1, method=METHOD)


def _fast_attention_max(q: Tensor, k: Tensor, scale: float, valid: Tensor | None) -> Tensor:
    """(B, H_kv, N_k) float32: softmax over every key of each query row of the Triton logits (causal and
    padding masked in the kernel; a row with no allowed key gives 0, not NaN), max over the group's heads
    and queries (and 0), in pieces of at most ``CHUNK_ELEMENTS`` logits."""
    from attnlab.kernels.decode.logits import logit_chunks

    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    out: Tensor | None = None
    for c in logit_chunks(q, k, scale, CHUNK_ELEMENTS, causal=True, key_mask=valid):
        probs = torch.softmax(c.logits, dim=-1).nan_to_num_(0.0)  # (a row with no allowed key: NaN -> 0)
        best = probs.view(b, c.kv1 - c.kv0, -1, n_k).amax(2)  # (>= 0)
        if out is None and c.kv0 == 0 and c.kv1 == h_kv:  # (one piece: no other buffer)
            out = best
        else:
            if out is None:
                out = torch.zeros(b, h_kv, n_k, device=q.device)
            out[:, c.kv0 : c.kv1] = torch.maximum(out[:, c.kv0 : c.kv1], best)
    return out if out is not None else torch.zeros(b, h_kv, n_k, device=q.device)  # (no query rows)


def _scores_torch(
    logits: Tensor, lse: Tensor, h_kv: int, params: RecycledParams, valid: Tensor | None
) -> Tensor:
    """(B, H_kv, N_k) float32: the pooled scores of a fused full step from the decode kernel's logits
    (B, H, N_q, N_k) and lse (B, H, N_q), in PyTorch (the formula of
    :func:`attnlab.kernels.decode.recycled_scores.recycled_scores`)."""
    # max over the group's rows of exp(logit - lse) = exp of the max (exp is increasing); a row with no
    # allowed key (lse -inf) has only -inf logits: 0
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    best = (logits - lse[..., None]).unflatten(1, (h_kv, -1)).amax(dim=(2, 3)).exp_()
    return _pooled(best, params, valid)


def _fused_scores(
    logits: Tensor, lse: Tensor, h_kv: int, params: RecycledParams, valid: Tensor | None
) -> Tensor:
    """:func:`_scores_torch` in one Triton launch that reads the logits once
    (:func:`attnlab.kernels.decode.recycled_scores.recycled_scores`), or in PyTorch where that kernel
    cannot run on the logits' device or the pool is wider than it unrolls
    (:data:`attnlab.kernels.decode.recycled_scores.MAX_POOL`)."""
    from attnlab.kernels.triton_utils import triton_available, triton_refusal

    if triton_available():
        from attnlab.kernels.decode import recycled_scores as rs

        if params.pool <= rs.MAX_POOL and not triton_refusal(logits.device, rs.IMPORTED_INTERPRETED):
            return rs.recycled_scores(logits, lse, h_kv, params.pool, valid)
    return _scores_torch(logits, lse, h_kv, params, valid)


def _state(state: Any, k: Tensor) -> TokenSet | None:
    if state is None:
        return None
    if not isinstance(state, TokenSet):
        raise InputError(
            f"recycled: state must be the TokenSet of an earlier step or None, got {type(state).__name__}"
        )
    try:
        state.check("recycled", k.shape[0], k.shape[1], k.shape[2])
    except ValueError as e:
        raise InputError(str(e)) from None
    return state


def _full_step(
    q: Tensor,
    k: Tensor,
    params: RecycledParams,
    scale: float,
    valid: Tensor | None = None,
    *,
    fast: bool = False,
) -> TokenSet:
    n_k = k.shape[2]
    if params.budget >= n_k:
        pos = torch.arange(n_k, device=k.device, dtype=torch.int32).expand(k.shape[0], k.shape[1], -1)
        return TokenSet(pos.contiguous(), n_k, 1, method=METHOD)
    return _keep(keep_scores(q, k, params, scale, valid, fast=fast), params, n_k)


def select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | Attended | None, TokenSet]:
    """Full step (None: exact attention, and a new kept set) or the kept set plus the appended tokens.
    ``fast``: a full step attends and weighs in one pass (the decode kernel's own logits and lse,
    :func:`attnlab.catalog.decode._common.attend_with_logits`), up to its size limit."""
    p: RecycledParams = call.params  # type: ignore[assignment]
    st = _state(state, k)
    if st is None or st.step % p.stride == 0:
        key_mask = extra.get("key_mask")
        if fast and p.budget < k.shape[2]:  # the attention and its weights in one pass over the cache
            fused = attend_with_logits(q, k, v, call.scale, key_mask)
            if fused is not None:
                out, lse, logits = fused
                scores = _fused_scores(logits, lse, k.shape[1], p, valid_keys(key_mask))
                return Attended(out), _keep(scores, p, k.shape[2], ordered=False)
        return None, _full_step(q, k, p, call.scale, valid_keys(key_mask), fast=fast)
    nxt = TokenSet(st.positions, st.n_k, st.step + 1, method=METHOD)
    return Selection(st.index(k.shape[2]), 1), nxt


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: RecycledParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, TokenSet]:
    """Full steps: exact causal attention (fp32 when ``upcast``) and the kept set from the pooled
    attention (module docstring). Other steps: causal attention over the kept and appended tokens.
    Padding (``key_mask`` <= 0) is never attended (it is kept only when the budget exceeds the real tokens,
    and then masked); kept entries < 0 are holes, as the decode executors read them."""
    require_causal("recycled", causal)
    st = _state(state, k)
    if st is None or st.step % params.stride == 0:
        out = attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask)
        return out, _full_step(q, k, params, scale, valid_keys(key_mask))
    out = attend_reference(q, k, v, st.mask(k.shape[2]), scale=scale, upcast=upcast, key_mask=key_mask)
    return out, TokenSet(st.positions, st.n_k, st.step + 1, method=METHOD)


SPEC = MethodSpec(
    name="recycled",
    family="decode",
    paper="Recycled Attention / RefreshKV (Xu et al., 2024)",
    summary="decode: full attention every s steps; in between, the top-k tokens of the last full step",
    param_class=RecycledParams,
    reference=reference,
    backends=(triton_decode(select), torch_decode(select)),
    patterns=CAUSAL_PATTERNS,
    test_params=({"budget": 12, "stride": 3, "pool": 3}, {"budget": 16, "stride": 2, "pool": 1}),
    bench_params=lambda n: [{"budget": 4096, "stride": 10}],
    inputs=(KEY_MASK,),
    stateful=True,
)
