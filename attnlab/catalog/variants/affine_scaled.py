"""``affine_scaled``: softmax weights under an input-dependent affine map, ``alpha_i * P_ij + beta_i / n_i``.

Affine-Scaled Attention (2025) relaxes the unit sum of the softmax weights with an input-dependent
scale and a corresponding bias on the normalised weights. Here both are tensor inputs of shape
(B, H, N_q) (any dim may be 1), computed by the caller's own layers: ``alpha`` scales the softmax
weights and ``beta`` is spread uniformly over the ``n_i`` allowed keys of row ``i``, so a row's weights
sum to ``alpha_i + beta_i`` and

    O_i = alpha_i * sum_j P_ij v_j + beta_i * mean_{j allowed} v_j

Without ``alpha`` (``beta``) the scale is 1 (the bias 0): plain softmax. A row with no allowed key is 0.
How the paper computes alpha and beta from the layer input (and any tie between them) is the caller's;
this method fixes only how they act on the weights.

No log-sum-exp (``return_lse=True`` is refused on every backend): the weights ``alpha P + beta M / n`` are
not a softmax of any logits, and the lse of the softmax ``P`` inside would not merge split outputs (the
``beta`` part averages by key counts, not by ``exp(lse)``).

The map is linear in the normalised weights, so it acts on softmax attention's output:
``O = alpha * O_softmax + beta * mean_allowed(V)`` (a running mean, no N x N). Backends: ``sdpa`` (plain
softmax through torch SDPA, cuDNN first on Hopper, then that map), ``flex``, ``eager``.

Cost of the map: on CUDA (``FUSED_DEVICES``, the default) it runs as fused Triton passes (:mod:`attnlab.kernels.score_transform.affine`:
chunk sums of ``V``, then one pass reading ``O_softmax`` and ``V`` and writing ``O``, the prefix sums made
inside each chunk; the backward likewise). The unfused PyTorch form (:func:`_finish_torch`: fp32 copies, a cumsum,
a gather, several elementwise passes, each with its autograd backward) made the ``sdpa`` path 0.18-0.61x
of cuDNN at 8K-32K causal on the H100 (benchmarks/results/h100-2026-11-23-s2/variants/NOTES.md); it
remains the CPU path and the one inside ``torch.compile``. The fused passes, checked on the H100 against
the fp32 reference at the timed lengths, bring the ``sdpa`` path to 0.83-0.97x of cuDNN
(benchmarks/results/h100-2026-11-23-s4/variants).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.eager import EAGER
from attnlab.catalog.variants._common import (
    SdpaFinishBackend,
    VariantFlexBackend,
    allowed,
    logits,
    softmax_rows,
    weigh,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.kernels.heads import expand_kv
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class AffineScaledParams(Params):
    """No parameters: ``alpha`` and ``beta`` are tensor inputs (B, H, N_q), any dim may be 1."""

    method = "affine_scaled"


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AffineScaledParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
) -> Tensor:
    """``O = (alpha_i * P_ij + beta_i * M_ij / n_i) V`` with ``P = softmax(scale * Q K^T)`` over the allowed
    keys ``M_ij`` (``j <= i + N_k - N_q`` when causal), ``n_i = sum_j M_ij``; rows with ``n_i = 0`` are 0."""
    s = logits(q, k, scale, upcast)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    w = softmax_rows(s, mask)
    if alpha is not None:
        w = w * alpha.to(w.dtype)[..., None]
    if beta is not None:
        m = torch.ones_like(s) if mask is None else mask.to(s.dtype).expand_as(s)
        n = m.sum(dim=-1, keepdim=True)
        w = w + beta.to(w.dtype)[..., None] * m / n.clamp(min=1)
    return weigh(w, v, upcast).to(q.dtype)


def allowed_mean(v: Tensor, n_q: int, causal: bool, heads: int) -> Tensor:
    """``mean_{j allowed} v_j`` per query row, fp32 (B, H, N_q, D_v), from a running sum (no N x N)."""
    b, h_kv, n_k, d_v = v.shape
    vf = v.float()
    if not causal:
        mean = vf.mean(dim=2, keepdim=True).expand(b, h_kv, n_q, d_v)
    else:
        pos = torch.arange(n_q, device=v.device) + (n_k - n_q)  # the last allowed key of each row
        running = vf.cumsum(dim=2)[:, :, pos.clamp(min=0)]
        mean = running / (pos.clamp(min=0) + 1).to(vf.dtype)[:, None]
        mean = mean * (pos >= 0).to(vf.dtype)[:, None]  # rows before the first key: no key, 0
    return expand_kv(mean, heads)


#: devices where the map runs as the fused Triton kernel (tests add "cpu" under TRITON_INTERPRET=1).
#: CUDA since checked and timed on the H100 (s4); ``()`` gives the PyTorch form everywhere.
FUSED_DEVICES: tuple[str, ...] = ("cuda",)


def _fused(out: Tensor) -> bool:
    if out.device.type not in FUSED_DEVICES or torch.compiler.is_compiling():
        return False
    from attnlab.kernels.triton_utils import interpreting, triton_refusal

    return not triton_refusal(out.device, interpreting())


def _finish(out: Tensor, lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, call: Call,
            extra: Mapping[str, Tensor]) -> Tensor:  # fmt: skip
    """``alpha * out + beta * mean_allowed(v)``: the fused kernel where it runs (see the module
    docstring), else :func:`_finish_torch`."""
    if _fused(out):
        from attnlab.kernels.score_transform.affine import affine_finish

        return affine_finish(out, v, extra.get("alpha"), extra.get("beta"), call.problem.causal)
    return _finish_torch(out, lse, q, k, v, call, extra)


def _finish_torch(out: Tensor, lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, call: Call,
                  extra: Mapping[str, Tensor]) -> Tensor:  # fmt: skip
    """The map in PyTorch ops, fp32 (the CPU path and the one inside torch.compile)."""
    alpha, beta = extra.get("alpha"), extra.get("beta")
    res = out.float()
    if alpha is not None:
        res = res * alpha.float()[..., None]
    if beta is not None:
        res = res + beta.float()[..., None] * allowed_mean(v, q.shape[2], call.problem.causal, q.shape[1])
    return res.to(out.dtype)


def _per_query(name: str, doc: str) -> TensorInput:
    return TensorInput(name, ("B", "H", "N_q"), doc, required=False, broadcast=True)


SPEC = MethodSpec(
    name="affine_scaled",
    family="dense",
    paper="Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention (2025)",
    summary="alpha_i * softmax weights + beta_i spread over the allowed keys (tensor inputs alpha, beta)",
    param_class=AffineScaledParams,
    reference=reference,
    backends=(SdpaFinishBackend(_finish), VariantFlexBackend(finish=_finish), EAGER),
    patterns=ALL_PATTERNS,
    inputs=(
        _per_query("alpha", "scales each query's softmax weights"),
        _per_query("beta", "added weight, spread uniformly over each query's allowed keys"),
    ),
    test_params=({},),
    bench_params=lambda n: [{}],
    softmax_normalized=False,  # the weights of a row sum to alpha + beta
)
