"""``gla``: Gated Linear Attention (Yang et al., 2024), a per-channel, data-dependent decay of the state.

Recurrence (fla's ``naive_recurrent_gla``; decay on the key dimension)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S (B, H, D, D_v), float32
    o_t = scale * S_t^T q_t                         scale defaults to 1/sqrt(D), as in fla

``g`` (B, H, N, D) is the natural log of the decay, ``g <= 0`` and finite (decay in (0, 1]); GLA's layer
makes it ``logsigmoid(x W) / 16``. The chunked backends (``torch_chunk``, ``triton``) floor g at -128 in
float32 (``naive.GATE_FLOOR``) before its chunk-local cumsum: exp(g) is 0 in float32 there as for any
smaller g, so outputs and states are the recurrence's for any finite g (float32's min, a float64 g below
float32's range); the gradient at a floored gate is 0 (torch_chunk) or 0 up to rounding (triton), as the
recurrence's is (exp(g) times a finite value). Causal self-attention only (a recurrence has no non-causal or cross
form); GQA: k and v are shared by the query heads of a group, g and the state are per query head.
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
    expand_heads,
    gated_recurrence,
    linear_kernels,
    sample_log_decay,
    start_gate_check,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.kernels.linear.naive import gla_chunk_naive
from attnlab.params import Params


@dataclass(frozen=True)
class GLAParams(Params):
    """``chunk``: tokens per chunk of the chunked backends (default 64; the result does not depend on it,
    up to rounding; the Triton kernels take 16, 32 or 64)."""

    method = "gla"
    chunk: int = 64

    def validate(self) -> None:
        self.check_int("chunk", minimum=1)


def _need_causal(method: str, causal: bool) -> None:
    if not causal:
        raise UnsupportedPatternError(f"method {method!r} is a causal recurrence: call it with causal=True")


def _state(q: Tensor, v: Tensor, state: Any) -> Tensor | None:
    b, h, _, d = q.shape
    s, _ = check_state("gla", state, b, h, d, v.shape[-1], q.device, with_sum=False)
    return s


def _gate(g: Tensor | None) -> Tensor:
    if g is None:
        raise InputError("method 'gla' needs the tensor input g (B, H, N, D): the log-decays, g <= 0")
    check_gate_inputs("gla", g=g)  # (one host synchronisation)
    return g


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: GLAParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The GLA recurrence token by token: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``,
    ``o_t = scale * S_t^T q_t`` (fp32 when ``upcast``, else in the input dtype). Returns (o (B, H, N, D_v)
    in q's dtype, S_N (B, H, D, D_v) float32)."""
    _need_causal("gla", causal)
    g = _gate(g)
    s0 = _state(q, v, state)
    dt = torch.float32 if upcast else q.dtype
    h = q.shape[1]
    o, s = gated_recurrence(
        q.to(dt), expand_heads(k, h).to(dt), expand_heads(v, h).to(dt), g.to(dt), scale, s0
    )
    return o.to(q.dtype), s.float()


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    assert isinstance(call.params, GLAParams)
    g = _gate(extra.get("g"))
    s0 = _state(q, v, state)
    h = q.shape[1]
    o, s = gla_chunk_naive(q, expand_heads(k, h), expand_heads(v, h), g, call.scale, s0, call.params.chunk)
    return o.to(q.dtype), s


def _run_triton(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    gla_chunk = linear_kernels().gla_chunk
    assert isinstance(call.params, GLAParams)
    g = extra.get("g")
    s0 = _state(q, v, state)
    h = q.shape[1]
    in_kernel = g is not None and checks_in_step_kernel(q.shape[2], q, k, v, g, s0)
    if in_kernel:  # decode: the step kernel checks g as it reads it (no reduction before the launch)
        assert g is not None
        gg = g

        def on_bad() -> None:
            check_gate_inputs("gla", g=gg)

        return gla_chunk(
            q,
            expand_heads(k, h),
            expand_heads(v, h),
            g,
            call.scale,
            s0,
            call.params.chunk,
            on_bad_gates=on_bad,
        )
    if g is None:
        _gate(g)  # (raises: g is required)
    # a prefill checks g without waiting: the reductions launch first, the kernels after them, and the
    # host reads the result (an asynchronous copy) before returning
    finish = start_gate_check("gla", g=g)
    out = gla_chunk(q, expand_heads(k, h), expand_heads(v, h), g, call.scale, s0, call.params.chunk)
    if finish is not None:
        finish()
    return out


def _run_triton_varlen(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], cu_seqlens: Tensor
) -> tuple[Tensor, Tensor]:
    """Packed sequences (q (1, H, T, D), g (1, H, T, D) packed like q) in one launch of
    ``gla_chunk_varlen``, each from a zero state: (o (1, H, T, D_v), final states (S, H, D, D_v) float32)."""
    from attnlab.kernels.linear.op import gla_chunk_varlen

    assert isinstance(call.params, GLAParams)
    g = _gate(extra.get("g"))
    h = q.shape[1]
    o, s = gla_chunk_varlen(
        q, expand_heads(k, h), expand_heads(v, h), g, call.scale, None, call.params.chunk, cu_seqlens
    )
    return o.to(q.dtype), s


def triton_refusal(call: Call) -> list[str]:
    """Limits of the Triton kernels shared by the gated-linear methods: chunk 16/32/64, head dims <= 256,
    and with gradients the backward's state tile (per-channel gates for gla, one per head for lightning)."""
    from attnlab.kernels.linear.limits import backward_refusals, kernel_refusals

    chunk = getattr(call.params, "chunk", 64)
    p = call.problem
    out = kernel_refusals(chunk, p.head_dim, p.v_dim)
    if p.requires_grad:
        out += backward_refusals(p.head_dim, p.v_dim, p.dtype, per_channel=call.spec.name == "gla")
    return out


SPEC = MethodSpec(
    name="gla",
    family="linear",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training (Yang et al., 2024)",
    summary="linear attention with a per-channel data-dependent decay exp(g) of the state (g: input)",
    param_class=GLAParams,
    reference=reference,
    backends=(triton_chunk(_run_triton, triton_refusal, varlen=_run_triton_varlen), torch_chunk(_run_torch)),
    patterns=CAUSAL_ONLY,
    test_params=({}, {"chunk": 16}),
    bench_params=lambda n: [{}],
    inputs=(
        TensorInput(
            "g", ("B", "H", "N_q", "D"), "log-decay per channel, finite and <= 0", sample=sample_log_decay
        ),
    ),
    stateful=True,
    softmax_normalized=False,
)
