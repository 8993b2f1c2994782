"""``alibi``: softmax attention with ALiBi's linear distance penalty, ``s_ij - m_h * |p_i - j|``.

Each query head ``h`` has a slope ``m_h``; the logit of key ``j`` for query ``i`` (at position
``p_i = i + N_k - N_q``, bottom-right) loses ``m_h * |p_i - j|``. Causal calls only see ``j <= p_i``, so
the penalty is ``m_h * (p_i - j)`` as in the ALiBi paper; non-causal calls use ``|p_i - j|`` both ways,
as FlashAttention's ``alibi_slopes`` does. The penalty is added after ``scale`` (it is not scaled).

Slopes (``max_bias = 8``, the paper's): for H a power of two, ``m_h = 2 ** (-max_bias * (h + 1) / H)``,
h = 0..H-1 (1/2, 1/4, ..., 1/256 for H = 8); otherwise the slopes of the power of two ``n`` below H
followed by every other slope of ``2n``, up to H slopes (the paper's code). A ``slopes`` tensor (H,)
passed to the call replaces them (e.g. learned slopes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.variants._common import (
    VariantEagerBackend,
    VariantFlexBackend,
    allowed,
    captured,
    logits,
    row_lse,
    sample_positive,
    softmax_attend,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class AlibiParams(Params):
    """``max_bias``: the exponent scale of the geometric slopes (> 0, default 8.0, the paper's)."""

    method = "alibi"
    max_bias: float = 8.0

    def validate(self) -> None:
        self.check_float("max_bias", positive=True)


def alibi_slopes(heads: int, max_bias: float = 8.0) -> list[float]:
    """The ALiBi slope of each of ``heads`` heads (see the module docstring)."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-max_bias * (h + 1) / n) for h in range(n)]

    n = 2 ** math.floor(math.log2(heads))
    if n == heads:
        return geometric(heads)
    return geometric(n) + geometric(2 * n)[0::2][: heads - n]


def slopes_of(q: Tensor, params: AlibiParams, slopes: Tensor | None) -> Tensor:
    """The (H,) fp32 slopes of a call: the ``slopes`` input, else :func:`alibi_slopes`."""
    if slopes is not None:
        return slopes.float()
    return torch.tensor(alibi_slopes(q.shape[1], params.max_bias), dtype=torch.float32, device=q.device)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AlibiParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    slopes: Tensor | None = None,
) -> Tensor:
    """``O = softmax_j(scale * q_i . k_j - m_h * |p_i - j|) V``, ``p_i = i + N_k - N_q``, over the allowed
    keys (``j <= p_i`` when causal); ``m_h`` from ``slopes`` or :func:`alibi_slopes`. A row with no key
    is 0."""
    s = _scores(q, k, params, scale, upcast, slopes)
    return softmax_attend(s, allowed(q.shape[2], k.shape[2], causal, q.device), v, q.dtype, upcast)


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AlibiParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log sum_j exp(scale * q_i . k_j - m_h * |p_i - j|)`` over the
    allowed keys, float32 (B, H, N_q), -inf on a row with no key)."""
    s = _scores(q, k, params, scale, upcast, slopes)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    return softmax_attend(s, mask, v, q.dtype, upcast), row_lse(s, mask)


def _scores(
    q: Tensor, k: Tensor, params: AlibiParams, scale: float, upcast: bool, slopes: Tensor | None
) -> Tensor:
    """The penalised logits (B, H, N_q, N_k)."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = logits(q, k, scale, upcast)
    pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
    dist = (pos - torch.arange(n_k, device=q.device)[None, :]).abs().to(s.dtype)
    return s - slopes_of(q, params, slopes).to(s.dtype)[None, :, None, None] * dist


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod:
    assert isinstance(call.params, AlibiParams)
    p = call.problem
    given = extra.get("slopes")
    if given is not None:
        slopes = given.float()
    else:
        slopes = torch.tensor(
            alibi_slopes(p.heads, call.params.max_bias), dtype=torch.float32, device=p.device
        )
    slopes = captured(slopes)
    offset = torch.tensor(p.n_k - p.n_q, dtype=torch.int32, device=p.device)

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - slopes[h] * (q_idx + offset - kv_idx).abs().to(torch.float32)

    return alibi


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    assert isinstance(call.params, AlibiParams)
    return KernelArgs(slopes=slopes_of(q, call.params, extra.get("slopes")))


SPEC = MethodSpec(
    name="alibi",
    family="dense",
    paper="Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation "
    "(ALiBi; Press et al., 2022)",
    summary="softmax with a per-head linear distance penalty -m_h * |p - j| (ALiBi slopes)",
    param_class=AlibiParams,
    reference=reference,
    backends=(
        TritonScoreBackend(_kernel_args),
        VariantFlexBackend(_score, per_call=True, lse=True),
        VariantEagerBackend(reference_lse),
    ),
    # training: Flex first (its forward + backward ran 1.01-1.32x faster than the kernel's at 8K-32K on the H100,
    # benchmarks/results/h100-2026-11-23/variants/); inference: the kernel (ahead of Flex forward)
    training_backends=("flex",),
    patterns=ALL_PATTERNS,
    inputs=(
        TensorInput(
            "slopes",
            ("H",),
            "per-head slopes m_h (default: ALiBi's geometric slopes)",
            required=False,
            sample=sample_positive,
        ),
    ),
    test_params=({}, {"max_bias": 2.0}),
    bench_params=lambda n: [{}],
    # softmax-normalised over its transformed logits: its lse is reference_lse's (the reference backend's
    # too), not the plain one of scale * q . k
    softmax_normalized=False,
    reference_lse=reference_lse,
)
