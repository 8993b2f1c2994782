"""``lightning``: Lightning Attention-2 / TransNormerLLM, linear attention with a constant decay per head.

Definition (the official lightning-attention reference, ``o_i = sum_{j<=i} lambda_h^(i-j) (q_i . k_j) v_j``)
as a recurrence::

    S_t = lambda_h S_{t-1} + k_t v_t^T              S (B, H, D, D_v), float32
    o_t = scale * S_t^T q_t

``lambda_h = exp(-s_h)`` with ``s_h`` the ALiBi slopes of H heads (``s_h = 2^(-8 (h+1) / H)`` for H a
power of two; otherwise the slopes of the power of two below, then every other slope of twice that, as
``_build_slope_tensor`` does), or the decays given as the optional input ``decay`` (H,), each in (0, 1]
(TransNormerLLM's per-layer factor is the user's to apply there; a float64 decay's log is taken in
float64, so any decay in (0, 1] has a finite log-decay, which the chunked backends floor at -128,
``naive.GATE_FLOOR``: a decay of exp(-128) or less is 0 in float32 alike). No normaliser. The official kernels
have no 1/sqrt(D) scale: pass ``scale=1.0`` to match them (attnlab's default scale is 1/sqrt(D)).
fla's ``lightning_attn`` uses other decays (linear in the head index): compare with it only through
``decay``. The Lightning-2 tiling (intra-block quadratic, inter-block recurrent) is the chunked form of
the backends. Causal self-attention only; GQA: k and v shared by a group's query heads, decay and state
per query head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.linear_chunk import torch_chunk, triton_chunk
from attnlab.catalog.linear._common import (
    CAUSAL_ONLY,
    check_state,
    expand_heads,
    gated_recurrence,
    linear_kernels,
    sample_decay,
)
from attnlab.catalog.linear.gla import triton_refusal
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.kernels.linear.naive import gla_chunk_naive
from attnlab.params import Params
from attnlab.settings import settings


@dataclass(frozen=True)
class LightningParams(Params):
    """``chunk``: tokens per chunk (block) of the chunked backends (default 64, Lightning-2's BLOCK; the
    result does not depend on it up to rounding; the Triton kernels take 16, 32 or 64)."""

    method = "lightning"
    chunk: int = 64

    def validate(self) -> None:
        self.check_int("chunk", minimum=1)


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi slopes of ``heads`` heads (Lightning-2 / TransNormerLLM decay rates s_h)."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return power_of_2(heads)
    c = 2 ** math.floor(math.log2(heads))
    return power_of_2(c) + power_of_2(2 * c)[0::2][: heads - c]


#: The default log-decays -s_h by (heads, device); read-only (callers take views, never write).
_DEFAULT_LOG_DECAYS: dict[tuple[int, torch.device], Tensor] = {}


def log_decays(heads: int, decay: Tensor | None, device: torch.device) -> Tensor:
    """log(lambda_h) per head, float32 (H,): from ``decay`` (checked to lie in (0, 1]; the log taken in
    float64 for a float64 decay, so finite for any decay in (0, 1]) or the ALiBi slopes. The chunked
    backends floor the log-decays at ``naive.GATE_FLOOR`` (-128: decay exp(-128), 0 in float32 as any
    smaller one; the gradient to ``decay`` there is 0, as the float32 recurrence's)."""
    if decay is None:  # (made once per heads and device: a decode step makes no host-to-device copy)
        key = (heads, device)
        cached = _DEFAULT_LOG_DECAYS.get(key)
        if cached is None:
            with torch.inference_mode(False):  # (a normal tensor, whatever mode the first call ran in)
                cached = -torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=device)
            if not torch.compiler.is_compiling():
                _DEFAULT_LOG_DECAYS[key] = cached
        return cached
    if decay.dim() != 1 or decay.shape[0] != heads:
        raise InputError(f"decay has shape {tuple(decay.shape)}; method 'lightning' expects (H={heads},)")
    if settings.check_values and not (
        torch.compiler.is_compiling() or (decay.is_cuda and torch.cuda.is_current_stream_capturing())
    ):  # (one host synchronisation; ``attnlab.settings.check_values`` off skips it, like gla's gate check)
        ok = (decay > 0) & (decay <= 1)  # False for NaN too
        if not bool(ok.all()):
            bad = decay[~ok].tolist()
            raise InputError(
                f"method 'lightning': decay holds {len(bad)} value(s) outside (0, 1]: {bad[:4]}; each head's "
                "decay lambda_h must satisfy 0 < lambda_h <= 1"
            )
    # the log in the decay's own dtype when wider than float32 (a float64 decay of 1e-300 is in (0, 1]
    # but 0 in float32: log(0) = -inf; log(1e-300) = -690.8 is finite in float32), then float32
    wide = decay if decay.dtype == torch.float64 else decay.float()
    return torch.log(wide).float()


def _gate(q: Tensor, decay: Tensor | None) -> Tensor:
    """The per-head log-decay as a gate broadcastable to (B, H, N, D)."""
    return log_decays(q.shape[1], decay, q.device)[None, :, None, None]


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: LightningParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token by token: ``S_t = lambda_h S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` (fp32 when
    ``upcast``). Returns (o (B, H, N, D_v) in q's dtype, S_N (B, H, D, D_v) float32)."""
    if not causal:
        raise UnsupportedPatternError("method 'lightning' is a causal recurrence: call it with causal=True")
    b, h, _, d = q.shape
    s0, _ = check_state("lightning", state, b, h, d, v.shape[-1], q.device, with_sum=False)
    dt = torch.float32 if upcast else q.dtype
    g = _gate(q, decay).to(dt)
    o, s = gated_recurrence(q.to(dt), expand_heads(k, h).to(dt), expand_heads(v, h).to(dt), g, scale, s0)
    return o.to(q.dtype), s.float()


def _args(
    q: Tensor, v: Tensor, extra: Mapping[str, Tensor], state: Any, broadcast: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(the gate, (B, H, N, D), or (1, H, 1, 1) without ``broadcast``: the Triton ops broadcast it; the
    initial state, checked)."""
    b, h, n, d = q.shape
    s0, _ = check_state("lightning", state, b, h, d, v.shape[-1], q.device, with_sum=False)
    g = _gate(q, extra.get("decay"))
    return (g.expand(b, h, n, d) if broadcast else g), s0


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    assert isinstance(call.params, LightningParams)
    g, s0 = _args(q, v, extra, state)
    h = q.shape[1]
    o, s = gla_chunk_naive(q, expand_heads(k, h), expand_heads(v, h), g, call.scale, s0, call.params.chunk)
    return o.to(q.dtype), s


def _run_triton(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Tensor]:
    assert isinstance(call.params, LightningParams)
    g, s0 = _args(q, v, extra, state, broadcast=False)
    h = q.shape[1]
    o, s = linear_kernels().gla_chunk(
        q, expand_heads(k, h), expand_heads(v, h), g, call.scale, s0, call.params.chunk
    )
    return o, s


def _run_triton_varlen(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], cu_seqlens: Tensor
) -> tuple[Tensor, Tensor]:
    """Packed sequences (q (1, H, T, D)) in one launch of ``gla_chunk_varlen``, each from a zero state:
    (o (1, H, T, D_v), final states (S, H, D, D_v) float32). The per-head decay is the same for every
    sequence (it has no token axis)."""
    from attnlab.kernels.linear.op import gla_chunk_varlen

    assert isinstance(call.params, LightningParams)
    g, _ = _args(q, v, extra, None, broadcast=False)  # (the packed op broadcasts it)
    h = q.shape[1]
    o, s = gla_chunk_varlen(
        q, expand_heads(k, h), expand_heads(v, h), g, call.scale, None, call.params.chunk, cu_seqlens
    )
    return o.to(q.dtype), s


SPEC = MethodSpec(
    name="lightning",
    family="linear",
    paper="Lightning Attention-2 (Qin et al., 2024); TransNormerLLM (Qin et al., 2023)",
    summary="linear attention with a constant decay per head (ALiBi-slope decays, or the input decay)",
    param_class=LightningParams,
    reference=reference,
    backends=(triton_chunk(_run_triton, triton_refusal, varlen=_run_triton_varlen), torch_chunk(_run_torch)),
    patterns=CAUSAL_ONLY,
    test_params=({}, {"chunk": 16}),
    bench_params=lambda n: [{}],
    inputs=(
        TensorInput(
            "decay",
            ("H",),
            "decay per head in (0, 1] (default: exp(-ALiBi slope))",
            False,
            sample=sample_decay,
        ),
    ),
    stateful=True,
    softmax_normalized=False,
)
