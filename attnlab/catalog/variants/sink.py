"""``sink``: softmax attention with a learnable sink logit per head that joins the normaliser (gpt-oss).

Each query head ``h`` has a logit ``s_h`` (not scaled) that enters the softmax's denominator as one
more column with no value vector::

    P_ij = exp(x_ij) / (exp(s_h) + sum_j' exp(x_ij')),   x = scale * q . k,   O_i = sum_j P_ij v_j

Equivalently: append ``s_h`` as an extra logit column, softmax, drop the column. The weights of a row
sum to less than 1; a row with no allowed key puts all its mass on the sink and returns 0 (also with
``s_h = -inf``, when the row has nothing at all). The log-sum-exp (``return_lse``) is the log of that
denominator, the sink's term included: ``lse_i = log(exp(s_h) + sum_j exp(x_ij))``, so ``s_h`` on a row
with no key (-inf only where ``s_h`` is -inf too, +inf where ``s_h`` is +inf). Evan Miller's
"off-by-one" softmax is ``s_h = 0`` for every head, the default: a ``sinks`` tensor (H,) passed to the
call (gpt-oss's learned per-head parameter) replaces the constant ``logit``. The FlexAttention path
runs plain softmax and rescales: ``O = O_softmax * sigmoid(lse - s_h)`` (0 where its lse is -inf), and its
lse with the sink is ``logaddexp(lse, s_h)``. The ``sdpa`` backend runs
torch SDPA with the sink as one more key: q gains columns ``s_h / scale`` (split in a high and a low part
so a bf16 q keeps the fp32 sink; q and k zero-padded to a multiple of 8 wide, D + 8 for D a multiple of
8), a key ``[0, ..., 1, 1]`` with a zero value is prepended, exact and differentiable by autograd (q, k,
v and ``sinks``). Bottom-right causal over the N_k + 1 keys keeps every original pair (key ``j`` is key
``j + 1`` there, and the offset grows by one) and lets query ``i`` see the sink exactly when
``i >= N_q - N_k - 1``: every row that has a key, and the one row just before them, whose only key is
the sink (output 0, as the reference's keyless row). The first ``N_q - N_k - 1`` rows of a cross call
with ``N_q > N_k + 1`` see neither and return 0, as in the reference.
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
    logits,
    row_lse,
    safe_softmax,
    weigh,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS


@dataclass(frozen=True)
class SinkParams(Params):
    """``logit``: the sink logit of every head when no ``sinks`` tensor is given (finite; default 0.0,
    the off-by-one softmax)."""

    method = "sink"
    logit: float = 0.0

    def validate(self) -> None:
        self.check_float("logit")


def sink_logits(q: Tensor, params: SinkParams, sinks: Tensor | None) -> Tensor:
    """The (H,) fp32 sink logits of a call: the ``sinks`` input, else ``logit`` for every head."""
    if sinks is not None:
        return sinks.float()
    return torch.full((q.shape[1],), float(params.logit), dtype=torch.float32, device=q.device)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SinkParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    sinks: Tensor | None = None,
) -> Tensor:
    """``O_i = sum_j exp(x_ij) v_j / (exp(s_h) + sum_j exp(x_ij))`` over the allowed keys (``j <= i + N_k -
    N_q`` when causal), ``x = scale * q . k``, ``s_h`` from ``sinks`` or ``logit``; computed stably with
    the row maximum taken over the logits and the sink. A row with no key is 0 (with ``s_h = -inf`` too);
    ``s_h = -inf`` is plain softmax and ``s_h = +inf`` gives 0 (all the weight on the sink, whose value is
    zero)."""
    return _attend(q, k, v, params, causal, scale, upcast, sinks, want_lse=False)[0]


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SinkParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log(exp(s_h) + sum_j exp(x_ij))`` over the allowed keys,
    float32 (B, H, N_q): ``s_h`` on a row with no key, -inf only where ``s_h`` is -inf too, +inf where
    ``s_h`` is +inf)."""
    out, lse = _attend(q, k, v, params, causal, scale, upcast, sinks, want_lse=True)
    assert lse is not None
    return out, lse


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SinkParams,
    causal: bool,
    scale: float,
    upcast: bool,
    sinks: Tensor | None,
    want_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    x = logits(q, k, scale, upcast)
    sink = sink_logits(q, params, sinks).to(x.dtype)[None, :, None, None].expand(*x.shape[:3], 1)
    saturated = torch.isposinf(sink)  # all the weight on the sink: output 0 (softmax of +inf is NaN)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    full = torch.cat([x, sink.masked_fill(saturated, 0.0)], dim=-1)
    # (a row with no key and s_h = -inf holds only -inf: zeros, not torch.softmax's NaN)
    p = safe_softmax(full)[..., :-1].masked_fill(saturated, 0.0)
    out = weigh(p, v, upcast).to(q.dtype)
    if not want_lse:
        return out, None
    return out, row_lse(full, None).masked_fill(saturated[..., 0], float("inf"))


def rescale(out: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """Softmax output and log-sum-exp -> the sink's output: ``O * sigmoid(lse - s_h)`` (``sink`` (H,)); 0
    on a row whose lse is -inf (no key: ``sigmoid(-inf - s_h)`` is NaN for ``s_h = -inf``; the -inf is
    replaced before the sigmoid too, so that no NaN reaches the gradients either)."""
    lse = lse.float()
    empty = torch.isneginf(lse)
    w = torch.sigmoid(torch.where(empty, torch.zeros_like(lse), lse) - sink.float()[None, :, None])
    w = torch.where(empty, torch.zeros_like(w), w)
    return (out.float() * w[..., None]).to(out.dtype)


def with_sink(lse: Tensor, sink: Tensor) -> Tensor:
    """Softmax's log-sum-exp (B, H, N_q) -> the sink's, ``log(exp(lse) + exp(s_h))`` (``sink`` (H,)),
    computed stably (``logaddexp``); -inf where both are -inf (with zero gradients there: logaddexp's
    would be NaN)."""
    lse = lse.float()
    s = sink.float()[None, :, None].expand_as(lse)
    nothing = torch.isneginf(lse) & torch.isneginf(s)
    zero = torch.zeros_like(lse)
    both = torch.logaddexp(torch.where(nothing, zero, lse), torch.where(nothing, zero, s))
    return torch.where(nothing, torch.full_like(lse, float("-inf")), both)


def _flex_lse(lse: Tensor, q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
    assert isinstance(call.params, SinkParams)
    return with_sink(lse, sink_logits(q, call.params, extra.get("sinks")))


def _finish(out: Tensor, lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, call: Call,
            extra: Mapping[str, Tensor]) -> Tensor:  # fmt: skip
    assert lse is not None and isinstance(call.params, SinkParams)
    return rescale(out, lse, sink_logits(q, call.params, extra.get("sinks")))


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    assert isinstance(call.params, SinkParams)
    return KernelArgs(sinks=sink_logits(q, call.params, extra.get("sinks")))


def sdpa_sink(q: Tensor, k: Tensor, v: Tensor, sink: Tensor, *, causal: bool, scale: float) -> Tensor:
    """Sink attention through torch SDPA: ``sink`` (H,) fp32 logits become a prepended key with a zero
    value; (B, H, N_q, D) x (B, H_kv, N_k, D) -> (B, H, N_q, D_v), bottom-right causal, GQA kept (the
    sink key is shared by a group: the per-head logit rides on q). Rows with no key give 0.

    The logit rides on q as ``sink / scale`` split into a q-dtype part and its remainder (two columns), clamped
    to a quarter of q's dtype's largest value: in fp16 a logit of -1e4 (or -inf: no sink) at scale 1/8 would
    overflow to -inf, and -inf times the real keys' zero sink column is NaN. At the clamp the sink's weight
    is ``exp(-max/4 * scale)`` of the largest score's (0 in fp32 at any scale above 1e-4 in fp16; the
    positive side saturates the same way, every row then attending to the zero-value sink)."""
    b, h, n_q, d = q.shape
    big = torch.finfo(q.dtype).max / 4
    s = (sink.float() / scale).clamp(-big, big)
    hi = s.to(q.dtype).float()
    width = -(-(d + 2) // 8) * 8  # SDPA's fused kernels want D a multiple of 8: zero columns are exact
    cols = torch.stack([hi, s - hi], dim=-1).to(q.dtype)  # (H, 2)
    qx = q.new_zeros(b, h, n_q, width)
    qx[..., :d] = q
    qx[..., d : d + 2] = cols[None, :, None, :]
    kx = k.new_zeros(k.shape[0], k.shape[1], k.shape[2] + 1, width)
    kx[:, :, 1:, :d] = k
    kx[:, :, 0, d : d + 2] = 1.0
    d_v = v.shape[3]
    # D_v == D: v padded to q's width too (CPU SDPA took 2x longer with D_qk != D_v at 4K), output sliced
    vx = v.new_zeros(v.shape[0], v.shape[1], v.shape[2] + 1, width if d_v == d else d_v)
    vx[:, :, 1:, :d_v] = v
    return sdpa_dense(qx, kx, vx, causal=causal, scale=scale)[..., :d_v]


class SinkSdpaBackend(Backend):
    """Sink attention as torch SDPA over one extra key (see :func:`sdpa_sink`): exact, differentiable."""

    name = "sdpa"
    summary = "torch SDPA with the sink as a prepended zero-value key (q gains the per-head logit)"
    caps = Capabilities()

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        assert isinstance(call.params, SinkParams)
        sink = sink_logits(q, call.params, extra.get("sinks"))
        return sdpa_sink(q, k, v, sink, causal=call.problem.causal, scale=call.scale)


SPEC = MethodSpec(
    name="sink",
    family="dense",
    paper="gpt-oss-120b & gpt-oss-20b Model Card (OpenAI, 2025), learned attention sinks; "
    "Attention Is Off By One (Evan Miller, 2023)",
    summary="softmax with a per-head sink logit in the denominator (off-by-one softmax by default)",
    param_class=SinkParams,
    reference=reference,
    backends=(
        TritonScoreBackend(_kernel_args),
        VariantFlexBackend(finish=_finish, needs_lse=True, lse=True, lse_map=_flex_lse),
        SinkSdpaBackend(),
        VariantEagerBackend(reference_lse),
    ),
    # training: Flex first (its forward + backward ran 0.99-1.06x the kernel's speed at 8K-32K on the H100, ahead at 7 of 8 points,
    # benchmarks/results/h100-2026-11-23/variants/); inference: the kernel (ahead of Flex forward)
    training_backends=("flex",),
    patterns=ALL_PATTERNS,
    inputs=(TensorInput("sinks", ("H",), "per-head sink logits s_h (not scaled)", required=False),),
    test_params=({}, {"logit": 2.0}, {"logit": -3.0}),
    bench_params=lambda n: [{}],
    softmax_normalized=False,  # the weights do not sum to 1 (its lse, reference_lse, holds the sink's term)
    reference_lse=reference_lse,
)
