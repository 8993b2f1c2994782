"""Backends of decode-time KV selection: a method's selector picks cache entries, an executor attends to them.

A decode method (family ``decode``) is called with a few queries q (B, H, N_q, D) against the whole cache
k/v (B, H_kv, N_k, D), causal bottom-right, and carries a state from step to step. Its *selector*::

    select(q, k, v, call, extra, state, fast) -> (Selection | Attended | None, new_state)

says which cache entries each (batch, KV head) reads (:class:`Selection`; None: every token, i.e. exact
attention, e.g. when the budget covers the cache), or returns the step's output itself (:class:`Attended`:
a step that attends to every token and selects by the weights of that same attention). ``fast`` is True on the GPU path (the selector may use
Triton kernels there) and False on the PyTorch path. The executors:

- ``triton``: attnlab's split-K decode kernel over the index list (:mod:`attnlab.kernels.decode`): the
  query heads of a KV group share one program, so each selected K/V tile is read once per group. No host
  synchronisation; shapes depend only on the call's shapes and the budget, so a step can be captured in a
  CUDA graph. Exact calls run dense SDPA (cuDNN / flash on the GPU).
- ``torch``: gather the selected tokens and run SDPA with their mask (any device; the CPU path).

Selections are per KV head: every query head of a group attends to the same entries (the method says how
the group's heads are combined into one choice). The optional tensor input ``key_mask`` (B, N_k), > 0 for
a real token, hides padding (a batch's left padding) from both executors and from the exact path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.kernels.decode.naive import selected_mask
from attnlab.kernels.heads import expand_kv
from attnlab.kernels.sdpa import sdpa_dense, sdpa_masked
from attnlab.kernels.triton_utils import triton_refusal
from attnlab.masks import check_dense_size

_OP_MODULE = "attnlab.kernels.decode.op"


@dataclass(frozen=True)
class Selection:
    """The cache entries one decode step reads, per (batch, KV head).

    - ``index`` (B, H_kv, n) int32: entry ``e`` covers cache tokens ``index[..., e] * page + [0, page)``
      (tokens past the cache end are ignored); negative entries cover nothing. Entries must not repeat.
    - ``page``: tokens per entry (1: a token list; a power of two up to 256).
    - ``count`` (B, H_kv) int32 or None: only the first ``count`` entries of each row count (rows of
      different lengths in one tensor, e.g. full-cache heads beside windowed ones).
    - ``counter`` int32 zeros or None: completion counters the method keeps in its state for the Triton
      executor (``attnlab.kernels.decode.op.decode_launch``: its split-K kernel then merges in the same
      launch); the executor leaves them zero.
    """

    index: Tensor
    page: int
    count: Tensor | None = None
    counter: Tensor | None = None

    def token_mask(self, n_k: int) -> Tensor:
        """(B, H_kv, N_k) bool: the cache tokens selected."""
        return selected_mask(self.index, self.page, n_k, self.count)

    @property
    def max_tokens(self) -> int:
        """Tokens a (batch, KV head) reads at most: n * page."""
        return int(self.index.shape[2]) * self.page


@dataclass(frozen=True)
class Attended:
    """A selector's answer when it already attended (e.g. a full step whose selection needs the attention's
    own weights: one pass gives both): ``out`` (B, H, N_q, D_v) in q's dtype is the step's output."""

    out: Tensor


#: ``select(q, k, v, call, extra, state, fast) -> (Selection | Attended | None, new_state)``
Selector = Callable[
    [Tensor, Tensor, Tensor, Call, Mapping[str, Tensor], Any, bool], tuple[Selection | Attended | None, Any]
]


def gather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sel: Selection,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Attention over the selected tokens by gathering them and running SDPA with their mask (any device);
    ``key_mask`` (B, N_k): tokens <= 0 are padding. Rows with no allowed token give 0."""
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    idx = sel.index.long()
    n = idx.shape[2]
    valid = idx >= 0
    if sel.count is not None:
        valid = valid & (torch.arange(n, device=idx.device) < sel.count.long()[..., None])
    tok = (idx.clamp(min=0)[..., None] * sel.page + torch.arange(sel.page, device=idx.device)).flatten(2)
    ok = valid.repeat_interleave(sel.page, dim=-1) & (tok < n_k)
    tok = torch.where(ok, tok, torch.zeros_like(tok))
    if key_mask is not None:
        ok = ok & (key_mask.gather(1, tok.flatten(1)).view(tok.shape) > 0)
    check_dense_size(b * h * n_q * tok.shape[-1], "the torch decode path's mask", "the triton backend")
    kg = k.gather(2, tok[..., None].expand(-1, -1, -1, k.shape[-1]))
    vg = v.gather(2, tok[..., None].expand(-1, -1, -1, v.shape[-1]))
    mask = ok[:, :, None, :]
    if causal:
        pos = torch.arange(n_q, device=q.device) + (n_k - n_q)
        mask = mask & (tok[:, :, None, :] <= pos[:, None])
    mask = expand_kv(mask.expand(b, k.shape[1], n_q, tok.shape[-1]), h)
    return sdpa_masked(q, kg, vg, mask=mask, scale=scale)


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, key_mask: Tensor | None
) -> Tensor:
    """Every cache token (dense SDPA: cuDNN / flash on the GPU), padding hidden when ``key_mask`` is given."""
    if key_mask is None:
        return sdpa_dense(q, k, v, causal=causal, scale=scale)
    n_q, n_k = q.shape[2], k.shape[2]
    # (a padded prefill through a decode method: the mask is N_q x N_k per sequence)
    check_dense_size(q.shape[0] * n_q * n_k, "exact attention with a key_mask", "a prefill method")
    mask = (key_mask > 0)[:, None, None, :]
    if causal:
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        mask = mask & (torch.arange(n_k, device=q.device)[None, :] <= pos)
    return sdpa_masked(q, k, v, mask=mask, scale=scale)


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class DecodeSelectBackend(Backend):
    """A decode method's selector with one executor (``triton`` or ``torch``); carries the method's state."""

    #: its refusals (capabilities and the Triton/device rule) do not depend on the cache length N_k, so a
    #: model integration may reuse a resolved call while only N_k grows (attnlab.hf's bound decode step)
    length_free_refusals = True

    def __init__(
        self, name: str, summary: str, caps: Capabilities, selector: Selector, *, triton: bool
    ) -> None:
        self.name = name
        self.summary = summary
        self.caps = caps
        self.selector = selector
        self.triton = triton

    def reasons(self, call: Call) -> list[str]:
        if not self.triton:
            return []
        why = triton_refusal(call.problem.device, _imported_interpreted())
        return [why] if why else []

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        sel, new_state = self.selector(q, k, v, call, extra, state, self.triton)
        if isinstance(sel, Attended):
            return sel.out, new_state
        causal = call.problem.causal
        key_mask = extra.get("key_mask")
        if sel is None:
            return exact_attention(q, k, v, call.scale, causal, key_mask), new_state
        if self.triton:
            from attnlab.kernels.decode.op import decode_attention

            out, _ = decode_attention(
                q, k, v, sel.index, sel.count, sel.page, call.scale, causal, key_mask, sel.counter
            )
            return out, new_state
        return gather_attention(q, k, v, sel, call.scale, causal, key_mask), new_state

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self.run_state(q, k, v, call, extra, None)[0]


def triton_decode(selector: Selector) -> DecodeSelectBackend:
    """The Triton backend of a decode method (GPU; CPU only in Triton's interpreter)."""
    return DecodeSelectBackend(
        "triton",
        "selection (Triton kernels where the method has them: page_topk's is one fused launch) + attnlab's "
        "split-K decode kernel "
        "over the selected entries (GQA groups read K/V once; CPU only interpreted)",
        Capabilities(
            same_v_dim=True,
            max_head_dim=256,
            backward=False,
            stateful=True,
            where="GPU; CPU via Triton's interpreter",
        ),
        selector,
        triton=True,
    )


def torch_decode(selector: Selector) -> DecodeSelectBackend:
    """The PyTorch backend of a decode method: the same selection, gather + SDPA (any device)."""
    return DecodeSelectBackend(
        "torch",
        "selection in PyTorch, then gather of the selected tokens + masked SDPA (any device)",
        Capabilities(backward=False, stateful=True),
        selector,
        triton=False,
    )
