"""``softcap``: softmax attention with Gemma-2's logit soft-capping, ``cap * tanh(s / cap)``.

Gemma 2 caps attention logits at 50 (``attn_logit_softcapping``): each logit ``s = scale * q . k`` is
replaced by ``cap * tanh(s / cap)`` before the softmax, which keeps every logit inside ``(-cap, cap)``
and is close to the identity for ``|s| << cap``. The cap applies after the scale (as in Gemma 2, whose
queries are scaled by ``query_pre_attn_scalar ** -0.5`` before the dot product) and before the mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.eager import EAGER
from attnlab.catalog.variants._common import VariantFlexBackend, allowed, logits, softmax_rows, weigh
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class SoftcapParams(Params):
    """``cap``: the soft cap on the logits (> 0; default 50.0, Gemma 2's attention cap)."""

    method = "softcap"
    cap: float = 50.0

    def validate(self) -> None:
        self.check_float("cap", positive=True)


def capped(s: Tensor, cap: float) -> Tensor:
    """``cap * tanh(s / cap)``."""
    return torch.tanh(s / cap) * cap


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: SoftcapParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """``O = softmax_j(cap * tanh(s_ij / cap)) V`` over the allowed keys, ``s_ij = scale * q_i . k_j``
    (``j <= i + N_k - N_q`` when causal); a row with no key is 0."""
    s = capped(logits(q, k, scale, upcast), params.cap)
    p = softmax_rows(s, allowed(q.shape[2], k.shape[2], causal, q.device))
    return weigh(p, v, upcast).to(q.dtype)


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod:
    assert isinstance(call.params, SoftcapParams)
    cap = torch.tensor(float(call.params.cap), dtype=torch.float32, device=call.problem.device)

    def softcap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / cap) * cap

    return softcap


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    assert isinstance(call.params, SoftcapParams)
    return KernelArgs(cap=float(call.params.cap))


SPEC = MethodSpec(
    name="softcap",
    family="dense",
    paper="Gemma 2: Improving Open Language Models at a Practical Size (Gemma Team, 2024), "
    "attention logit soft-capping",
    summary="softmax of cap * tanh(logit / cap) (Gemma 2's logit soft cap)",
    param_class=SoftcapParams,
    reference=reference,
    backends=(TritonScoreBackend(_kernel_args), VariantFlexBackend(_score), EAGER),
    patterns=ALL_PATTERNS,
    test_params=({"cap": 2.0}, {"cap": 0.5}, {"cap": 50.0}),
    bench_params=lambda n: [{}],
    softmax_normalized=False,  # it is softmax-normalised, but attnlab's reference lse is the plain one
)
