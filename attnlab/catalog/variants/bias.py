"""``bias``: softmax attention with an additive bias tensor, ``softmax(scale * q . k + bias)``.

The bias is a tensor input of shape (B, H, N_q, N_k) where any dim may be 1 (broadcast): a key padding
bias is (B, 1, 1, N_k), a relative-position table expanded per head is (1, H, N_q, N_k). It is added
after ``scale`` and before the mask; ``-inf`` entries mask pairs out (a row left with no key returns 0).
Without a bias the method is plain softmax attention. Gradients flow to the bias on the reference and
eager paths; on FlexAttention they follow PyTorch's support for captured tensors in a score_mod (GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.variants._common import (
    VariantEagerBackend,
    VariantFlexBackend,
    allowed,
    captured,
    heads_index,
    logits,
    row_lse,
    softmax_attend,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class BiasParams(Params):
    """No parameters: the bias is the tensor input ``bias`` (B, H, N_q, N_k), any dim may be 1."""

    method = "bias"


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: BiasParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    bias: Tensor | None = None,
) -> Tensor:
    """``O = softmax_j(scale * q_i . k_j + bias_{b,h,i,j}) V`` over the allowed keys (``j <= i + N_k - N_q``
    when causal, and ``bias > -inf``), broadcasting the bias's size-1 dims; a row with no key is 0."""
    s, mask = _scores(q, k, causal, scale, upcast, bias)
    return softmax_attend(s, mask, v, q.dtype, upcast)


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: BiasParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log sum_j exp(scale * q_i . k_j + bias_ij)`` over the allowed
    keys, float32 (B, H, N_q), -inf on a row with no key)."""
    s, mask = _scores(q, k, causal, scale, upcast, bias)
    return softmax_attend(s, mask, v, q.dtype, upcast), row_lse(s, mask)


def _scores(
    q: Tensor, k: Tensor, causal: bool, scale: float, upcast: bool, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The biased logits and the allowed pairs (causal, and the bias above -inf; None: all)."""
    s = logits(q, k, scale, upcast)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    if bias is not None:
        s = s + bias.to(s.dtype)
        finite = ~bias.isneginf()
        mask = finite if mask is None else mask & finite
    return s, mask


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod | None:
    given = extra.get("bias")
    if given is None:
        return None
    # float32 like the scores (a float64 bias would make the score_mod's sum float64, which the compiled
    # FlexAttention kernel does not take: wrong results, as alibi's slopes before)
    bias = captured(given.to(torch.float32))
    rows, cols = bias.shape[2] > 1, bias.shape[3] > 1

    def add_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bi, hi = heads_index(bias, b, h)
        return score + bias[bi, hi, q_idx if rows else 0, kv_idx if cols else 0]

    return add_bias


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    return KernelArgs(bias=extra.get("bias"))


SPEC = MethodSpec(
    name="bias",
    family="dense",
    paper="additive attention bias (relative positions, padding; FlashBias, Wu et al., 2025, for the "
    "low-rank form: attnlab.catalog.variants.lowrank_bias, not a registered method)",
    summary="softmax(scale*qk + bias) with a broadcastable (B, H, N_q, N_k) bias tensor",
    param_class=BiasParams,
    reference=reference,
    backends=(
        TritonScoreBackend(_kernel_args, backward=False),
        VariantFlexBackend(_score, per_call=True, lse=True),
        VariantEagerBackend(reference_lse),
    ),
    patterns=ALL_PATTERNS,
    inputs=(
        TensorInput(
            "bias", ("B", "H", "N_q", "N_k"), "added to the scaled logits", required=False, broadcast=True
        ),
    ),
    test_params=({},),
    bench_params=lambda n: [{}],
    # softmax-normalised over its transformed logits: its lse is reference_lse's (the reference backend's
    # too), not the plain one of scale * q . k
    softmax_normalized=False,
    reference_lse=reference_lse,
)
