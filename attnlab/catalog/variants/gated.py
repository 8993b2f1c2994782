"""``gated``: softmax attention followed by a head-specific sigmoid output gate, ``sigmoid(G) * O``.

Gated Attention (Qiu et al., 2025; the G1 position, after SDPA and before the output projection) gates
each head's attention output elementwise with ``sigmoid(G)``, where ``G`` is computed from the layer
input by a learned projection. Here ``G`` is the tensor input ``gate`` of shape (B, H, N_q, D_v) holding
the pre-sigmoid logits, in attnlab's head-major layout (the paper's code has [B, T, H, D]); any dim may
be 1, so (B, H, N_q, 1) is the paper's head-wise gate. Without a gate the output is not gated.

Backends: ``sdpa`` (plain softmax through torch SDPA, cuDNN first on Hopper, then the gate: the gate is
applied after the normalised attention, so the softmax needs no change), ``flex``, ``eager``.

The log-sum-exp (``return_lse``) is plain softmax's, ``log sum_j exp(scale * q_i . k_j)`` over the allowed
keys: the gate multiplies the output, not the weights, so split outputs still merge by it (the gate is the
same factor on every part). The reference, eager and flex (GPU) backends return it; sdpa does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.variants._common import (
    SdpaFinishBackend,
    VariantEagerBackend,
    VariantFlexBackend,
    allowed,
    logits,
    row_lse,
    softmax_rows,
    weigh,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class GatedParams(Params):
    """No parameters: the gate logits are the tensor input ``gate`` (B, H, N_q, D_v), any dim may be 1."""

    method = "gated"


def apply_gate(out: Tensor, gate: Tensor | None) -> Tensor:
    """``sigmoid(gate) * out`` in ``out``'s dtype (unchanged without a gate): two elementwise passes, each
    computing in fp32 and rounding once (the reference's low-precision form). The fp32 form (upcast both,
    multiply, round) took five passes, ~0.5 ms of the 1.41 ms gated forward at 8K on the H100 (56ab39e,
    benchmarks/results/h100-2026-11-23-s2/variants/); this form was not timed."""
    return out if gate is None else out * torch.sigmoid(gate.to(out.dtype))


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: GatedParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    gate: Tensor | None = None,
) -> Tensor:
    """``O = sigmoid(G) * softmax(scale * Q K^T) V`` elementwise (``G`` broadcast to (B, H, N_q, D_v);
    ``j <= i + N_k - N_q`` when causal; a row with no key is 0)."""
    s = logits(q, k, scale, upcast)
    out = weigh(softmax_rows(s, allowed(q.shape[2], k.shape[2], causal, q.device)), v, upcast)
    if gate is not None:
        out = out * torch.sigmoid(gate.to(out.dtype))
    return out.to(q.dtype)


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: GatedParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    gate: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, plain softmax's ``lse_i = log sum_j exp(scale * q_i . k_j)`` over the
    allowed keys, float32 (B, H, N_q), -inf on a row with no key)."""
    out = reference(q, k, v, params, causal=causal, scale=scale, upcast=upcast, gate=gate)
    return out, row_lse(logits(q, k, scale, upcast), allowed(q.shape[2], k.shape[2], causal, q.device))


def _finish(out: Tensor, lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, call: Call,
            extra: Mapping[str, Tensor]) -> Tensor:  # fmt: skip
    return apply_gate(out, extra.get("gate"))


SPEC = MethodSpec(
    name="gated",
    family="dense",
    paper="Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free "
    "(Qiu et al., 2025)",
    summary="sigmoid(gate) * softmax attention output, with the gate logits as a tensor input",
    param_class=GatedParams,
    reference=reference,
    backends=(
        SdpaFinishBackend(_finish),
        VariantFlexBackend(finish=_finish, lse=True),
        VariantEagerBackend(reference_lse),
    ),
    patterns=ALL_PATTERNS,
    inputs=(
        TensorInput(
            "gate", ("B", "H", "N_q", "D_v"), "pre-sigmoid gate logits", required=False, broadcast=True
        ),
    ),
    test_params=({},),
    bench_params=lambda n: [{}],
    reference_lse=reference_lse,  # plain softmax's lse (the gate acts on the output), the gate passed through
)
