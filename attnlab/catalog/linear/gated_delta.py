"""``gated_delta``: the gated delta rule: DeltaNet, Gated DeltaNet (one gate per head) and Kimi Delta
Attention (one gate per channel).

Recurrence (fla's naive step order: decay, delta, write, read)::

    S'_t = diag(exp(g_t)) S_{t-1}                   S (B, H, D, D_v), float32
    u_t  = beta_t (v_t - S'_t^T k_t)
    S_t  = S'_t + k_t u_t^T   =  (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t  = scale * S_t^T q_t                        scale defaults to 1/sqrt(D)

Inputs: ``beta`` (B, H, N) (the writing strength; GDN makes it sigmoid(x W), in (0, 1); with negative
eigenvalues allowed, 2 sigmoid, in (0, 2)); ``g`` (B, H, N, D) or (B, H, N, 1), optional: the log-decays,
finite and ``<= 0`` (the chunked backends floor g at -128 in float32, ``naive.GATE_FLOOR``, before its
chunk-local cumsum: exp(g) is 0 in float32 there as for any smaller g, so the result is the recurrence's
for any finite g, float32's min or a float64 g below float32's range included; the gradient at a floored
gate is 0, up to rounding on triton, as the recurrence's is). Shape (B, H, N, 1) is one gate per head and token (Gated DeltaNet: alpha_t = exp(g_t)
then commutes with the delta step); (B, H, N, D) one per channel (KDA); absent is DeltaNet (no decay).

``qk_l2norm`` (default True, as GDN's and KDA's layers set it): q and k are L2-normalised over D first,
``x / sqrt(sum x^2 + 1e-6)`` (the delta rule is stable for ||k|| <= 1 and beta in [0, 2]); the scale is
applied after. Causal self-attention only; GQA: k and v shared by a group's query heads, beta, g and the
state per query head (fla's GVA, more value than key heads, is the transpose of this and not offered).

Backends: ``triton`` runs the chunked WY/UT form in Triton (``attnlab.kernels.linear.op.delta_chunk``:
fp32 state, forward and chunked backward; q and k L2-normalised by the op's own launch, the norm's
Jacobian applied in its backward kernels); a short call without gradients (decode) takes the recurrent
step kernel, which L2-normalises q and k itself and (``settings.check_values``) checks g and beta as it
reads them. ``torch_chunk`` runs the same chunked form in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.linear_chunk import torch_chunk, triton_chunk
from attnlab.catalog.linear._common import (
    CAUSAL_ONLY,
    check_gate_inputs,
    check_state,
    checks_in_step_kernel,
    delta_recurrence,
    expand_heads,
    linear_kernels,
    sample_log_decay,
    sample_unit,
    start_gate_check,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.kernels.linear.naive import L2_EPS as L2_EPS
from attnlab.kernels.linear.naive import delta_chunk_naive
from attnlab.kernels.linear.naive import l2norm as l2norm
from attnlab.params import Params


@dataclass(frozen=True)
class GatedDeltaParams(Params):
    """``qk_l2norm``: L2-normalise q and k over D before the rule (default True). ``chunk``: tokens per
    chunk of the chunked backends (default 64; the result does not depend on it up to rounding)."""

    method = "gated_delta"
    qk_l2norm: bool = True
    chunk: int = 64

    def validate(self) -> None:
        self.check_bool("qk_l2norm")
        self.check_int("chunk", minimum=1)


def _inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: GatedDeltaParams,
    beta: Tensor | None,
    g: Tensor | None,
    state: Any,
    normalize: bool = True,
    check: bool = True,
    broadcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(q, k, v expanded to H heads, beta (B, H, N), g broadcast to (B, H, N, D) or None, initial state),
    checked (g and beta with one host synchronisation, unless ``check`` is False: the step kernel checks
    them); q and k L2-normalised when ``params.qk_l2norm`` and ``normalize`` (the Triton runner hands
    that to the kernels instead). ``broadcast`` False: beta and g as given (the Triton ops broadcast
    them; a decode step then makes no views)."""
    b, h, n, d = q.shape
    if beta is None:
        raise InputError("method 'gated_delta' needs the tensor input beta (B, H, N): the writing strength")
    if check:
        check_gate_inputs("gated_delta", g=g, beta=beta)
    if broadcast:
        beta = beta.expand(b, h, n)
        g = None if g is None else g.expand(b, h, n, d)
    s0, _ = check_state("gated_delta", state, b, h, d, v.shape[-1], q.device, with_sum=False)
    kk = expand_heads(k, h)
    if params.qk_l2norm and normalize:
        q, kk = l2norm(q), l2norm(kk)
    return q, kk, expand_heads(v, h), beta, g, s0


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: GatedDeltaParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    beta: Tensor | None = None,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token (module docstring), fp32 when ``upcast``. Returns
    (o (B, H, N, D_v) in q's dtype, S_N (B, H, D, D_v) float32)."""
    if not causal:
        raise UnsupportedPatternError("method 'gated_delta' is a causal recurrence: call it with causal=True")
    qq, kk, vv, bb, gg, s0 = _inputs(q, k, v, params, beta, g, state)
    dt = torch.float32 if upcast else q.dtype
    o, s = delta_recurrence(
        qq.to(dt), kk.to(dt), vv.to(dt), bb.to(dt), None if gg is None else gg.to(dt), scale, s0
    )
    return o.to(q.dtype), s.float()


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    p = call.params
    assert isinstance(p, GatedDeltaParams)
    qq, kk, vv, bb, gg, s0 = _inputs(q, k, v, p, extra.get("beta"), extra.get("g"), state)
    o, s = delta_chunk_naive(qq, kk, vv, bb, gg, call.scale, s0, p.chunk)
    return o.to(q.dtype), s


def _run_triton(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    p = call.params
    assert isinstance(p, GatedDeltaParams)
    beta, g = extra.get("beta"), extra.get("g")
    # decode: the step kernel checks g and beta as it reads them (no reduction launched before it)
    in_kernel = beta is not None and checks_in_step_kernel(
        q.shape[2], q, k, v, beta, g, state if isinstance(state, Tensor) else None
    )
    # a prefill checks g and beta without waiting: the reductions launch first, the kernels after them,
    # and the host reads the result (an asynchronous copy) before returning
    finish = None if in_kernel else start_gate_check("gated_delta", g=g, beta=beta)
    qq, kk, vv, bb, gg, s0 = _inputs(
        q, k, v, p, beta, g, state, normalize=False, check=False, broadcast=False
    )

    def on_bad() -> None:
        check_gate_inputs("gated_delta", g=g, beta=beta)

    # (q, k normalised by delta_chunk: in the step kernel for decode, else by the chunk op's own launch;
    # o comes in q's dtype)
    o, s = linear_kernels().delta_chunk(
        qq,
        kk,
        vv,
        bb,
        gg,
        call.scale,
        s0,
        p.chunk,
        qk_l2norm=p.qk_l2norm,
        on_bad_gates=on_bad if in_kernel else None,
    )
    if finish is not None:
        finish()
    return o, s


def _run_triton_varlen(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], cu_seqlens: Tensor
) -> tuple[Tensor, Tensor]:
    """Packed sequences (q (1, H, T, D), beta (1, H, T) and g (1, H, T, D | 1) packed like q) in one
    launch of ``delta_chunk_varlen``, each from a zero state: (o (1, H, T, D_v), final states
    (S, H, D, D_v) float32). With ``qk_l2norm``, q and k are L2-normalised by the packed op as by the
    unpacked one (``op.FUSED_L2NORM``: the fused launch; else PyTorch in float32, then q's dtype)."""
    from attnlab.kernels.linear.op import delta_chunk_varlen

    p = call.params
    assert isinstance(p, GatedDeltaParams)
    # (beta and g as given: the packed op broadcasts them; a (1, H, T, 1) gate then stays one per token)
    qq, kk, vv, bb, gg, _ = _inputs(
        q, k, v, p, extra.get("beta"), extra.get("g"), None, normalize=False, broadcast=False
    )
    o, s = delta_chunk_varlen(qq, kk, vv, bb, gg, call.scale, None, p.chunk, cu_seqlens, p.qk_l2norm)
    return o.to(q.dtype), s


def _triton_refusal(call: Call) -> list[str]:
    from attnlab.kernels.linear.limits import kernel_refusals

    assert isinstance(call.params, GatedDeltaParams)
    return kernel_refusals(call.params.chunk, call.problem.head_dim, call.problem.v_dim)


SPEC = MethodSpec(
    name="gated_delta",
    family="linear",
    paper="Gated Delta Networks (Yang et al., 2025); Parallelizing Linear Transformers with the Delta Rule "
    "(Yang et al., 2024); Kimi Linear (2025)",
    summary="delta rule S = (I - beta k k^T) diag(exp g) S + beta k v^T; beta and g (per head or channel) inputs",
    param_class=GatedDeltaParams,
    reference=reference,
    backends=(
        triton_chunk(_run_triton, _triton_refusal, varlen=_run_triton_varlen),
        torch_chunk(_run_torch),
    ),
    patterns=CAUSAL_ONLY,
    # (without qk_l2norm the delta rule is stable only for keys of norm <= sqrt(2 / beta): the registry's
    # standard-normal keys would blow it up, so that setting runs in tests/test_linear_methods.py)
    test_params=({}, {"chunk": 16}),
    bench_params=lambda n: [{}],
    inputs=(
        TensorInput("beta", ("B", "H", "N_q"), "writing strength per head and token", sample=sample_unit),
        TensorInput(
            "g",
            ("B", "H", "N_q", "D"),
            "log-decay <= 0, per channel, or (B, H, N, 1) per head",
            False,
            True,
            sample=sample_log_decay,
        ),
    ),
    stateful=True,
    softmax_normalized=False,
)
