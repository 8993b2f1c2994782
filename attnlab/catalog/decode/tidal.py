"""``tidal``: TidalDecode (Yang et al., 2024): a few selection layers run full attention and choose the
top-k token positions; the other layers of the same decode step reuse them.

Per layer, by its ``role``::

    "full":   exact causal attention; the state passes through unchanged
    "select": exact causal attention, and the positions for the layers after it:
              s[t] = max over the group's query heads and the call's queries of scale * q . k[t]
              (pre-softmax logits, bottom-right causal); keep the ``budget`` highest (sorted on the torch path;
              in top-k order on the triton path, whose decode kernel reads a list in any order)
    "reuse":  causal attention over the positions of the state (chosen by the last "select" layer of this
              step) and the tokens appended since they were chosen; with no state yet: exact attention

Budget in tokens; a budget >= N_k keeps every token.

Queries per call: "full" and "select" layers (and "reuse" without a state) run exact attention, defined for
any N_q. A "reuse" layer with a state takes at most as many queries as the state holds positions (K: the
selection layer's budget, or the whole cache then when the budget covered it): the call's queries sit at
the last N_q positions, so at most N_q - 1 of the K distinct chosen positions lie after its first query and
every query row sees at least one chosen token. Beyond that (a prefill through a "reuse" layer: its first
rows would see nothing) the call is refused with an InputError; TidalDecode runs its prefill dense.

Scores: the reference (and the ``torch`` backend) computes the logits in fp32 from fp32 copies of q and K;
the ``triton`` backend's select layer attends and scores in one pass (the decode kernel stores each
token's maximum logit over the group's rows; beyond the fused size limit, exact attention and then
:mod:`attnlab.kernels.decode.logits`): bf16 / fp16 products on the tensor cores, fp32 accumulation, so the
logits differ from the reference's by the summation order, and tokens whose scores nearly tie may rank
differently.

How a model passes the positions between layers (the HF integration wires this): the state is one
:class:`attnlab.state.reuse.TokenSet` per sequence and decode step, shared by the layers, not one per
layer. In each forward, call the layers in order and hand each layer's ``Result.state`` to the next
layer's call (``state=``); start a step with the state the previous step ended with (a "reuse" layer
before this step's "select" layer then reads the previous step's positions, extended by the tokens
appended since). With per-layer KV caches of equal length (every layer of a decoder), positions mean the
same token in every layer. TidalDecode's Llama-3-8B schedule (32 layers) is: layers 0-1 "full", layer 2
"select", layers 3-12 "reuse", layer 13 "select" (re-selection), layers 14-31 "reuse"; its prefill is
dense, which a plan gets by running ``softmax`` (or any prefill method) for prefill calls.

Conventions of other code: DerrickYLJ/TidalDecode selects per query head (after ``repeat_kv``) with top_k
256 (example script 128); here a KV group shares its positions (the max of its heads' logits, so a token
any head ranks high can be kept), which is what lets a group read its K/V once. Like TidalDecode, no sink
or local token is forced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
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
from attnlab.catalog.decode._evict import group_rows
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.reuse import TokenSet

ROLES = ("full", "select", "reuse")
#: The method's name, which its states carry (:class:`attnlab.state.reuse.TokenSet`).
METHOD = "tidal"
#: Score elements per chunk of query rows (fp32: 256 MiB).
CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class TidalParams(Params):
    """``budget``: positions chosen by a selection layer per (batch, KV head) (default 4096; TidalDecode
    uses 256). ``role``: this layer's role, "full", "select" or "reuse" (default "reuse"; a model plan sets
    it per layer)."""

    method = "tidal"
    budget: int = 4096
    role: str = "reuse"

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        if self.role not in ROLES:
            raise self._fail("role", self.role, f"one of {', '.join(ROLES)}")


def logit_scores(
    q: Tensor, k: Tensor, scale: float, valid: Tensor | None = None, *, fast: bool = False
) -> Tensor:
    """(B, H_kv, N_k) float32: max over the group's heads and the call's queries of the causal logits
    (-inf for padding, ``valid`` False). ``fast``: the logits from the Triton kernel
    (:func:`attnlab.kernels.decode.logits.group_logits`: the cache read once in its dtype)."""
    if fast:
        return _fast_logit_scores(q, k, scale, valid)
    b, _, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    qg = group_rows(q, h_kv)
    rows = max(1, CHUNK_ELEMENTS // (b * qg.shape[2] * n_k))
    out = torch.full((b, h_kv, n_k), float("-inf"), device=q.device)
    for j in range(h_kv):
        for r0 in range(0, n_q, rows):
            part = qg[:, j, :, r0 : r0 + rows].float()
            s = torch.einsum("bgrd,bnd->bgrn", part, k[:, j].float()) * scale
            pos = torch.arange(r0, r0 + part.shape[2], device=q.device)[:, None] + (n_k - n_q)
            s = s.masked_fill(torch.arange(n_k, device=q.device)[None, :] > pos, float("-inf"))
            out[:, j] = torch.maximum(out[:, j], s.amax(dim=(1, 2)))
    if valid is not None:
        out = out.masked_fill(~valid[:, None], float("-inf"))
    return out


def _fast_logit_scores(q: Tensor, k: Tensor, scale: float, valid: Tensor | None) -> Tensor:
    """:func:`logit_scores` from the Triton logits (padding and causality masked in the kernel), in
    pieces of at most ``CHUNK_ELEMENTS`` logits."""
    from attnlab.kernels.decode.logits import logit_chunks

    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    out: Tensor | None = None
    for c in logit_chunks(q, k, scale, CHUNK_ELEMENTS, causal=True, key_mask=valid):
        best = c.logits.view(b, c.kv1 - c.kv0, -1, n_k).amax(2)
        if c.kv0 == 0 and c.kv1 == h_kv and out is None:  # (one piece: no other buffer)
            out = best
        else:
            if out is None:
                out = torch.full((b, h_kv, n_k), float("-inf"), device=q.device)
            out[:, c.kv0 : c.kv1] = torch.maximum(out[:, c.kv0 : c.kv1], best)
    if out is None:  # (no query rows)
        out = torch.full((b, h_kv, n_k), float("-inf"), device=q.device)
    return out


def positions(
    q: Tensor, k: Tensor, p: TidalParams, scale: float, valid: Tensor | None = None, *, fast: bool = False
) -> TokenSet:
    """A selection layer's choice: the ``budget`` highest-scored positions (every one when it covers N_k;
    ``fast``: the scores from the Triton logits)."""
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    if p.budget >= n_k:
        every = torch.arange(n_k, device=k.device, dtype=torch.int32).expand(b, h_kv, -1)
        return TokenSet(every.contiguous(), n_k, method=METHOD)
    top = torch.topk(logit_scores(q, k, scale, valid, fast=fast), p.budget, dim=-1, sorted=False).indices
    return TokenSet(top.sort(dim=-1).values.to(torch.int32), n_k, method=METHOD)


def _state(state: Any, q: Tensor, k: Tensor, role: str) -> TokenSet | None:
    """The state, checked against the cache; a "reuse" call with more queries than the state's positions
    is refused (module docstring: queries per call)."""
    if state is None:
        return None
    if not isinstance(state, TokenSet):
        raise InputError(
            f"tidal: state must be the TokenSet of a selection layer or None, got {type(state).__name__}"
        )
    try:
        state.check("tidal", k.shape[0], k.shape[1], k.shape[2])
    except ValueError as e:
        raise InputError(str(e)) from None
    n_q, chosen = q.shape[2], state.positions.shape[2]
    if role == "reuse" and n_q > chosen:
        raise InputError(
            f"tidal: a 'reuse' call with N_q={n_q} queries over a state of {chosen} positions; expected "
            f"N_q <= {chosen} (the positions the selection layer chose), else the first queries of the call "
            "may see no token at all: run a prefill with a prefill method (or role 'full' / 'select')"
        )
    return state


def select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | Attended | None, TokenSet | None]:
    """Exact attention for "full" and "select" layers (the latter also choose positions); the state's
    positions (and the tokens appended since) for "reuse" layers. ``fast``: a "select" layer attends and
    scores in one pass (:func:`attnlab.catalog.decode._common.attend_with_logits`: the decode kernel's
    own logits), up to its size limit; beyond it, and on the torch path, exact attention then the scores."""
    p: TidalParams = call.params  # type: ignore[assignment]
    st = _state(state, q, k, p.role)
    if p.role == "select":
        if fast and p.budget < k.shape[2]:  # the attention and its logits in one pass over the cache
            fused = attend_with_logits(q, k, v, call.scale, extra.get("key_mask"), group_max=True)
            if fused is not None:
                out, _, scores = fused  # (B, H_kv, N_k): the max over the group's rows
                top = torch.topk(scores, p.budget, dim=-1, sorted=False).indices
                chosen = TokenSet(top.to(torch.int32), k.shape[2], method=METHOD)  # (in top-k order)
                return Attended(out), chosen
        return None, positions(q, k, p, call.scale, valid_keys(extra.get("key_mask")), fast=fast)
    if p.role == "full" or st is None:
        return None, st
    return Selection(st.index(k.shape[2]), 1), st


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: TidalParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, TokenSet | None]:
    """Causal softmax attention (fp32 when ``upcast``) over real tokens (``key_mask`` > 0) by the layer's
    role (module docstring); returns the state for the next layer."""
    require_causal("tidal", causal)
    st = _state(state, q, k, params.role)
    exact = attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask)
    if params.role == "select":
        return exact, positions(q, k, params, scale, valid_keys(key_mask))
    if params.role == "full" or st is None:
        return exact, st
    return attend_reference(q, k, v, st.mask(k.shape[2]), scale=scale, upcast=upcast, key_mask=key_mask), st


SPEC = MethodSpec(
    name="tidal",
    family="decode",
    paper="TidalDecode (Yang et al., 2024)",
    summary="decode: selection layers pick the top-k positions by full attention; the other layers reuse them",
    param_class=TidalParams,
    reference=reference,
    backends=(triton_decode(select), torch_decode(select)),
    patterns=CAUSAL_PATTERNS,
    test_params=({"budget": 12, "role": "reuse"}, {"budget": 12, "role": "select"}),
    bench_params=lambda n: [{"budget": 4096, "role": "reuse"}],
    inputs=(KEY_MASK,),
    stateful=True,
)
