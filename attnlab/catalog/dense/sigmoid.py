"""``sigmoid``: sigmoid attention (Ramapuram et al. 2024, FlashSigmoid), each weight an independent sigmoid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.eager import EAGER
from attnlab.backends.flex import FlexBackend
from attnlab.backends.triton_sigmoid import TritonSigmoidBackend
from attnlab.core import Call, MethodSpec
from attnlab.kernels.flex import ScoreMod
from attnlab.masks import causal_mask, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.reference import masked_sigmoid_attention
from attnlab.registry import register


@dataclass(frozen=True)
class SigmoidParams(Params):
    """``bias``: the additive bias b inside the sigmoid; None (default) means ``b = -ln(N_k)``.

    The paper recommends ``b = -ln n`` with n the sequence length, so that a row's total weight starts
    near 1 (N_k keys x e^b); its code's example config uses -ln 2048 = -7.62 for training length 2048.
    attnlab's default takes n = N_k of the call. The bias is not scaled by ``scale``.
    """

    method = "sigmoid"
    bias: float | None = None

    def validate(self) -> None:
        self.check_float("bias", optional=True)


def resolve_bias(params: SigmoidParams, n_k: int) -> float:
    """The bias a call uses: ``params.bias``, or ``-ln(N_k)``."""
    return float(params.bias) if params.bias is not None else -math.log(n_k)


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: SigmoidParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """``O_i = sum_j M_ij * sigmoid(scale * q_i . k_j + b) v_j`` with no normalisation over j.

    ``M_ij = 1`` for every pair when not causal, else ``j <= i + N_k - N_q``; ``b`` from
    :func:`resolve_bias`. A row with no allowed key is 0.
    """
    mask = mask_for(causal_mask, params, q.shape[2], k.shape[2], causal, q.device) if causal else None
    return masked_sigmoid_attention(
        q, k, v, scale=scale, bias=resolve_bias(params, k.shape[2]), mask=mask, upcast=upcast
    )


def _bias_of(call: Call) -> float:
    assert isinstance(call.params, SigmoidParams)
    return resolve_bias(call.params, call.problem.n_k)


def _flex_log_weight(call: Call) -> ScoreMod:
    """score_mod giving log sigmoid(s + b); the flex backend multiplies by exp(lse) to undo softmax."""
    bias = torch.tensor(_bias_of(call), dtype=torch.float32, device=call.problem.device)

    def log_sigmoid(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        x = score + bias
        return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))

    return log_sigmoid


SPEC = register(
    MethodSpec(
        name="sigmoid",
        family="dense",
        paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., 2024; "
        "code: github.com/apple/ml-sigmoid-attention)",
        summary="sigmoid(scale*qk + b) weights, no row normalisation; b = -ln(N_k) by default",
        param_class=SigmoidParams,
        reference=reference,
        backends=(TritonSigmoidBackend(_bias_of), FlexBackend(_flex_log_weight, unnormalized=True), EAGER),
        patterns=ALL_PATTERNS,
        test_params=({}, {"bias": 0.0}, {"bias": -2.5}),
        bench_params=lambda n: [{}],
        softmax_normalized=False,
    )
)
