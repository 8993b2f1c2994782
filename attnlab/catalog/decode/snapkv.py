"""``snapkv``: SnapKV (Li et al., 2024) eviction, as kvpress's ``SnapKVPress`` scores it.

Scores (per batch and KV head, once, at the first call; fp32)::

    w = min(window, N_q): the call's last w queries are the observation window
    P = softmax(scale * q_win k^T) over every key (bottom-right causal)     (B, H, w, N_k)
    s = mean of P over the window's queries, keys [0, N_k - w) only
    s = avg_pool1d(s, kernel, stride 1, padding kernel // 2)                 (zero padding counted)
    score = mean of s over the query heads of the KV group; the window's own keys score +inf (kept)

then the ``budget`` highest-scored tokens are kept (shared machinery and state: ``_evict``): the first
call runs exact attention, later calls attend to the kept prompt tokens and every token appended since.

The budget must be >= ``window`` (a ParamError otherwise): the window's keys are always kept, so with
``w <= window <= budget`` the +inf tier never holds more tokens than the budget and the kept set is
determined by the scores (a first call shorter than the window included: its window is its N_q queries).

Conventions of other code: SnapKV (``snapkv_utils.py``) keeps the window and the top
``max_capacity_prompt - window_size`` of the prefix, so its capacity covers the window; kvpress
(``kvpress/presses/snapkv_press.py``) pads the window's keys with the maximum score, so when it keeps fewer
tokens than the window, which window tokens survive is a tie broken by ``topk``; +inf here always keeps
them, and a budget below the window is refused. kvpress requires
N_q > window (a prefill); here a first call with fewer queries uses all of them as the window (e.g. a
first decode step: window 1). Defaults are kvpress's (window 64, kernel 5). Budget in tokens where
kvpress takes a compression ratio (ratio r keeps N_k * (1 - r) tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.backends.decode_select import torch_decode, triton_decode
from attnlab.catalog.decode import _evict
from attnlab.catalog.decode._common import CAUSAL_PATTERNS, KEY_MASK
from attnlab.core import MethodSpec
from attnlab.params import Params
from attnlab.state.eviction import EvictionState


@dataclass(frozen=True)
class SnapKVParams(Params):
    """``budget``: prompt tokens kept per (batch, KV head), the observation window's included, so at least
    ``window`` (default 4096). ``window``: queries of the observation window, the call's last ones (default
    64). ``kernel``: width of the average pooling over key positions, odd (default 5)."""

    method = "snapkv"
    budget: int = 4096
    window: int = 64
    kernel: int = 5

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("window", minimum=1)
        self.check_int("kernel", minimum=1)
        if self.kernel % 2 == 0:
            raise self._fail("kernel", self.kernel, "an odd width (the pooled scores keep their length)")
        if self.budget < self.window:
            raise self._fail(
                "budget",
                self.budget,
                f">= window={self.window} (the observation window is always kept and is part of the budget, "
                "as in SnapKV; lower the window or raise the budget)",
            )


def scores(q: Tensor, k: Tensor, params: SnapKVParams, scale: float, valid: Tensor | None = None) -> Tensor:
    """(B, H_kv, N_k) float32 SnapKV scores (module docstring), one KV group at a time (memory
    B x G x window x N_k floats)."""
    b, n_q = q.shape[0], q.shape[2]
    h_kv, n_k = k.shape[1], k.shape[2]
    w = min(params.window, n_q)
    qg = _evict.group_rows(q[:, :, n_q - w :], h_kv)
    out = torch.full((b, h_kv, n_k), float("inf"), device=q.device)
    if n_k - w <= 0:
        return out
    for j in range(h_kv):
        probs = _evict.causal_probs(qg[:, j], k[:, j], scale, n_q - w, n_q, valid)  # (B, G, w, N_k)
        s = probs.mean(2)[..., : n_k - w]
        s = F.avg_pool1d(s, params.kernel, stride=1, padding=params.kernel // 2)
        out[:, j, : n_k - w] = s.mean(1)
    return out


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SnapKVParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, EvictionState]:
    """First call (``state=None``): exact causal attention (fp32 when ``upcast``) and the SnapKV choice of
    ``budget`` tokens per (batch, KV head) by :func:`scores`. Later calls: causal attention over the kept
    tokens and the tokens appended since the first call."""
    return _evict.reference(
        "snapkv",
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


_select = _evict.selector("snapkv", scores)


SPEC = MethodSpec(
    name="snapkv",
    family="decode",
    paper="SnapKV (Li et al., 2024); kvpress SnapKVPress",
    summary="decode: evict the prompt's cache to a budget by pooled observation-window attention (SnapKV)",
    param_class=SnapKVParams,
    reference=reference,
    backends=(triton_decode(_select), torch_decode(_select)),
    patterns=CAUSAL_PATTERNS,
    test_params=({"budget": 12, "window": 4, "kernel": 3}, {"budget": 20, "window": 16, "kernel": 5}),
    bench_params=lambda n: [{"budget": 4096}, {"budget": 1024}],
    inputs=(KEY_MASK,),
    stateful=True,
)
