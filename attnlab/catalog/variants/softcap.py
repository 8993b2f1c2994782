"""``softcap``: softmax attention with Gemma-2's logit soft-capping, ``cap * tanh(s / cap)``.

Gemma 2 caps attention logits at 50 (``attn_logit_softcapping``): each logit ``s = scale * q . k`` is
replaced by ``cap * tanh(s / cap)`` before the softmax, which keeps every logit inside ``(-cap, cap)``
and is close to the identity for ``|s| << cap``. The cap applies after the scale (as in Gemma 2, whose
queries are scaled by ``query_pre_attn_scalar ** -0.5`` before the dot product) and before the mask.

``window`` (optional): Gemma 2/3's sliding layers soft-cap *and* attend within a window. Query ``i`` at
position ``p = i + N_k - N_q`` sees keys ``p - window < j`` (``window`` keys, itself included, when causal;
``|p - j| < window`` when not), attnlab's ``sliding_window`` convention: Hugging Face
``sliding_window=W`` is ``window=W``. The Triton score-transform kernel has no window and refuses such
calls; Flex applies it in the score_mod (no block skipping), eager/reference as a mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.catalog.variants._common import (
    VariantEagerBackend,
    VariantFlexBackend,
    allowed,
    logits,
    row_lse,
    softmax_attend,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class SoftcapParams(Params):
    """``cap``: the soft cap on the logits (> 0; default 50.0, Gemma 2's attention cap). ``window``: keys
    per query, self included, as ``sliding_window`` counts them (>= 1), or None (default: no window)."""

    method = "softcap"
    cap: float = 50.0
    window: int | None = None

    def validate(self) -> None:
        self.check_float("cap", positive=True)
        if self.window is not None:
            self.check_int("window", minimum=1)


def window_mask(n_q: int, n_k: int, window: int, causal: bool, device: Any) -> Tensor:
    """(N_q, N_k) bool: key ``j`` within ``window`` of query ``i``'s position ``p = i + N_k - N_q``
    (``p - window < j <= p`` when causal, ``|p - j| < window`` when not)."""
    pos = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    d = pos - torch.arange(n_k, device=device)[None, :]
    ok = (d < window) & (d > -window)
    return ok & (d >= 0) if causal else ok


def capped(s: Tensor, cap: float) -> Tensor:
    """``cap * tanh(s / cap)``."""
    return torch.tanh(s / cap) * cap


def _scores(
    q: Tensor, k: Tensor, params: SoftcapParams, causal: bool, scale: float, upcast: bool
) -> tuple[Tensor, Tensor | None]:
    """The capped logits (B, H, N_q, N_k) and the allowed pairs (None: all)."""
    s = capped(logits(q, k, scale, upcast), params.cap)
    n_q, n_k = q.shape[2], k.shape[2]
    if params.window is None:
        return s, allowed(n_q, n_k, causal, q.device)
    return s, window_mask(n_q, n_k, params.window, causal, q.device)


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: SoftcapParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """``O = softmax_j(cap * tanh(s_ij / cap)) V`` over the allowed keys, ``s_ij = scale * q_i . k_j``
    (``j <= i + N_k - N_q`` when causal; within ``window`` when set); a row with no key is 0."""
    s, mask = _scores(q, k, params, causal, scale, upcast)
    return softmax_attend(s, mask, v, q.dtype, upcast)


def reference_lse(
    q: Tensor, k: Tensor, v: Tensor, params: SoftcapParams, *, causal: bool, scale: float, upcast: bool = True
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log sum_j exp(cap * tanh(s_ij / cap))`` over the allowed keys,
    float32 (B, H, N_q), -inf on a row with no key)."""
    s, mask = _scores(q, k, params, causal, scale, upcast)
    return softmax_attend(s, mask, v, q.dtype, upcast), row_lse(s, mask)


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod:
    assert isinstance(call.params, SoftcapParams)
    p = call.problem
    cap = torch.tensor(float(call.params.cap), dtype=torch.float32, device=p.device)
    if call.params.window is None:

        def softcap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return torch.tanh(score / cap) * cap

        return softcap
    # the window as -inf scores (the causal side comes from the block mask); every row keeps its own key
    window = torch.tensor(min(int(call.params.window), p.n_q + p.n_k), dtype=torch.int32, device=p.device)
    shift = torch.tensor(p.n_k - p.n_q, dtype=torch.int32, device=p.device)
    neg = torch.tensor(float("-inf"), dtype=torch.float32, device=p.device)

    def softcap_window(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = q_idx + shift - kv_idx
        inside = (d < window) & (d > -window)
        return torch.where(inside, torch.tanh(score / cap) * cap, neg)

    return softcap_window


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    assert isinstance(call.params, SoftcapParams)
    return KernelArgs(cap=float(call.params.cap))


class _SoftcapTriton(TritonScoreBackend):
    """The score-transform kernel, which has no window: it refuses windowed calls."""

    def param_refusals(self, params: Params) -> list[str]:
        window = getattr(params, "window", None)
        if window is not None:
            return [
                f"the score-transform kernel has no window (softcap window={window}); flex or eager run it"
            ]
        return []


SPEC = MethodSpec(
    name="softcap",
    family="dense",
    paper="Gemma 2: Improving Open Language Models at a Practical Size (Gemma Team, 2024), "
    "attention logit soft-capping",
    summary="softmax of cap * tanh(logit / cap) (Gemma 2's logit soft cap)",
    param_class=SoftcapParams,
    reference=reference,
    backends=(
        _SoftcapTriton(_kernel_args),
        VariantFlexBackend(_score, lse=True),
        VariantEagerBackend(reference_lse),
    ),
    patterns=ALL_PATTERNS,
    test_params=({"cap": 2.0}, {"cap": 0.5}, {"cap": 50.0}, {"cap": 2.0, "window": 3}),
    bench_params=lambda n: [{}],
    # softmax-normalised over its transformed logits: its lse is reference_lse's (the reference backend's
    # too), not the plain one of scale * q . k
    softmax_normalized=False,
    reference_lse=reference_lse,
)
