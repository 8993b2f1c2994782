"""``selective``: softmax attention with a per-query temperature, ``softmax(tau_i * scale * q_i . k_j)``.

Selective Attention (Zhang et al., 2024) scales each query's logits by a temperature ``tau_i`` computed
from the query (and its position) by a small learned function, so that each query controls how peaked
its attention is. Here ``tau`` is a tensor input ``temperature`` of shape (B, H, N_q) (any dim may be
1) that *multiplies* the scaled logits: ``tau > 1`` sharpens, ``tau < 1`` flattens, ``tau = 0`` gives a
uniform average over the allowed keys; without it the method is plain softmax. The paper's value
temperature is not part of this method (scale ``v`` before the call). The ``sdpa`` backend, the default on
every device, runs torch SDPA on ``q * tau`` (exact; gradients reach ``temperature`` through autograd).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Capabilities
from attnlab.catalog.variants._common import (
    VariantEagerBackend,
    VariantFlexBackend,
    allowed,
    captured,
    heads_index,
    logits,
    row_lse,
    sample_positive,
    softmax_attend,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.kernels.flex import ScoreMod
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class SelectiveParams(Params):
    """No parameters: the temperature is the tensor input ``temperature`` (B, H, N_q), any dim may be 1."""

    method = "selective"


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SelectiveParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    temperature: Tensor | None = None,
) -> Tensor:
    """``O_i = softmax_j(tau_i * scale * q_i . k_j) V`` over the allowed keys (``j <= i + N_k - N_q`` when
    causal), ``tau`` (B, H, N_q) broadcast; without ``temperature``, ``tau = 1``. A row with no key is 0."""
    s = _scores(q, k, scale, upcast, temperature)
    return softmax_attend(s, allowed(q.shape[2], k.shape[2], causal, q.device), v, q.dtype, upcast)


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SelectiveParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    temperature: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log sum_j exp(tau_i * scale * q_i . k_j)`` over the allowed
    keys, float32 (B, H, N_q), -inf on a row with no key)."""
    s = _scores(q, k, scale, upcast, temperature)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    return softmax_attend(s, mask, v, q.dtype, upcast), row_lse(s, mask)


def _scores(q: Tensor, k: Tensor, scale: float, upcast: bool, temperature: Tensor | None) -> Tensor:
    s = logits(q, k, scale, upcast)
    return s if temperature is None else s * temperature.to(s.dtype)[..., None]


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod | None:
    given = extra.get("temperature")
    if given is None:
        return None
    tau = captured(given.to(torch.float32))  # float32 like the scores (see bias._score)
    rows = tau.shape[2] > 1

    def temperature(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bi, hi = heads_index(tau, b, h)
        return score * tau[bi, hi, q_idx if rows else 0]

    return temperature


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    return KernelArgs(temp=extra.get("temperature"))


class SelectiveSdpaBackend(Backend):
    """Selective attention as torch SDPA on ``q * tau[..., None]`` (``tau`` broadcast to (B, H, N_q)):
    exact, differentiable for q, k, v and ``temperature``; plain SDPA without the input."""

    name = "sdpa"
    summary = "torch SDPA on q scaled by the per-query temperature"
    caps = Capabilities()

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        tau = extra.get("temperature")
        if tau is not None:
            q = q * tau.to(q.dtype)[..., None]
        return sdpa_dense(q, k, v, causal=call.problem.causal, scale=call.scale)


SPEC = MethodSpec(
    name="selective",
    family="dense",
    paper="Selective Attention: Enhancing Transformer through Principled Context Control (Zhang et al., 2024)",
    summary="softmax of tau_i * scale*qk with a per-query temperature tensor tau (B, H, N_q)",
    param_class=SelectiveParams,
    reference=reference,
    # SDPA on q * tau first, on every device: exact, and it is plain softmax attention (cuDNN / flash on
    # a GPU) after one elementwise product, which neither Flex's score_mod nor the score-transform kernel
    # can beat by construction. On a CPU, Flex (chosen before: inference at D >= 16) compiled for 12-18 s
    # on each new shape and ran 10x slower at N=256 (0.9-1.25x of SDPA at N=1024-2048). Flex, then the
    # kernel (not timed on the GPU yet), stay for backend= (and variants_bench's sides).
    backends=(
        SelectiveSdpaBackend(),
        VariantFlexBackend(_score, per_call=True, lse=True),
        TritonScoreBackend(_kernel_args),
        VariantEagerBackend(reference_lse),
    ),
    patterns=ALL_PATTERNS,
    inputs=(
        TensorInput(
            "temperature",
            ("B", "H", "N_q"),
            "multiplies each query's scaled logits",
            required=False,
            broadcast=True,
            sample=sample_positive,
        ),
    ),
    test_params=({},),
    bench_params=lambda n: [{}],
    # softmax-normalised over its transformed logits: its lse is reference_lse's (the reference backend's
    # too), not the plain one of scale * q . k
    softmax_normalized=False,
    reference_lse=reference_lse,
)
