"""``linear``: linear attention (Katharopoulos et al., 2020) with a feature map phi, optionally normalised.

Recurrence (fla's ``linear_attn``; phi applied to q and k, as fla's layer does before its op)::

    S_t = S_{t-1} + phi(k_t) v_t^T          S (B, H, D, D_v), float32
    z_t = z_{t-1} + phi(k_t)                z (B, H, D): the running key sum (normalised only)
    o_t = scale * S_t^T phi(q_t)                                    normalize=False
    o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps)                   normalize=True (scale cancels)

``feature_map``: ``"elu"`` (elu(x) + 1, the paper's), ``"relu"`` or ``"identity"``. The normalised form is
the paper's (and fast-transformers', eps = 1e-6); fla's model default is unnormalised (then a per-head
RMSNorm), its ``chunk_linear_attn`` default normalised: say which you compare with. The identity map
with ``normalize=True`` is refused (phi(q) . z can be 0 or negative). relu features can give a row with
phi(q) . z = 0: its output is 0 (numerator 0 over eps).

Patterns: causal self, and non-causal self (every query reads the state after all N tokens:
``o_i = phi(q_i)^T S_N``, normalised by ``phi(q_i) . z_N``). State: S (unnormalised) or the pair (S, z)
(normalised), after the call's N tokens, from ``state`` (or zeros). GQA: k and v shared by a group's
query heads; the state is per query head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.backends.linear_chunk import torch_chunk, triton_chunk
from attnlab.catalog.linear._common import CAUSAL_ONLY, SELF_ONLY, check_state, expand_heads
from attnlab.core import Call, MethodSpec
from attnlab.kernels.linear.naive import gla_chunk_naive
from attnlab.params import Params

FEATURE_MAPS = ("elu", "relu", "identity")


@dataclass(frozen=True)
class LinearParams(Params):
    """``feature_map``: "elu" (elu(x)+1, default), "relu" or "identity". ``normalize``: divide by
    phi(q) . z, the running key sum (default True). ``eps``: added to that denominator (default 1e-6).
    ``chunk``: tokens per chunk of the chunked backends (default 64; Triton takes 16, 32, 64)."""

    method = "linear"
    feature_map: str = "elu"
    normalize: bool = True
    eps: float = 1e-6
    chunk: int = 64

    def validate(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise self._fail("feature_map", self.feature_map, f"one of {', '.join(FEATURE_MAPS)}")
        self.check_bool("normalize")
        self.check_float("eps", positive=True)
        self.check_int("chunk", minimum=1)
        if self.normalize and self.feature_map == "identity":
            raise self._fail(
                "feature_map",
                self.feature_map,
                "elu or relu with normalize=True (the identity map's denominator phi(q) . z can be 0 or "
                "negative); pass normalize=False for the identity map",
            )


def feature_map(x: Tensor, name: str) -> Tensor:
    """phi(x): elu(x) + 1, relu(x) or x."""
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    return x


def _states(p: LinearParams, q: Tensor, v: Tensor, state: Any) -> tuple[Tensor | None, Tensor | None]:
    b, h, _, d = q.shape
    return check_state("linear", state, b, h, d, v.shape[-1], q.device, with_sum=p.normalize)


def _zeros_if_none(s: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return like.new_zeros(shape) if s is None else s.to(like.dtype)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: LinearParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
) -> tuple[Tensor, Any]:
    """Token by token (causal) or in one sum (non-causal), as in the module docstring; fp32 when
    ``upcast``. Returns (o (B, H, N, D_v) in q's dtype, state float32: S, or (S, z) when normalised)."""
    s0, z0 = _states(params, q, v, state)
    dt = torch.float32 if upcast else q.dtype
    b, h, n, d = q.shape
    fq = feature_map(q.to(dt), params.feature_map)
    fk = feature_map(expand_heads(k, h).to(dt), params.feature_map)
    vv = expand_heads(v, h).to(dt)
    s = _zeros_if_none(s0, (b, h, d, v.shape[-1]), fq)
    z = _zeros_if_none(z0, (b, h, d), fq)
    if not causal:
        s = s + fk.transpose(-1, -2) @ vv
        z = z + fk.sum(2)
        num = fq @ s
        o = num / ((fq @ z[..., None]) + params.eps) if params.normalize else scale * num
    else:
        outs = []
        for t in range(n):
            s = s + fk[:, :, t, :, None] * vv[:, :, t, None, :]
            z = z + fk[:, :, t]
            num = torch.einsum("bhk,bhkv->bhv", fq[:, :, t], s)
            if params.normalize:
                den = (fq[:, :, t] * z).sum(-1, keepdim=True) + params.eps
                outs.append(num / den)
            else:
                outs.append(scale * num)
        o = torch.stack(outs, 2)
    return o.to(q.dtype), ((s.float(), z.float()) if params.normalize else s.float())


def _run(q: Tensor, k: Tensor, v: Tensor, call: Call, state: Any, chunked: Any) -> tuple[Tensor, Any]:
    """Shared by both backends: phi, then the unnormalised chunked recurrence ``chunked``; the normalised
    form runs it on v with a column of ones appended, whose state column is z."""
    p = call.params
    assert isinstance(p, LinearParams)
    s0, z0 = _states(p, q, v, state)
    b, h, n, d = q.shape
    vd = v.shape[-1]
    fq = feature_map(q, p.feature_map)
    fk = feature_map(expand_heads(k, h), p.feature_map)
    vv = expand_heads(v, h)
    if not call.problem.causal:  # two matmuls in fp32
        s = _zeros_if_none(s0, (b, h, d, vd), fq.float()) + fk.float().transpose(-1, -2) @ vv.float()
        num = fq.float() @ s
        if not p.normalize:
            return (call.scale * num).to(q.dtype), s
        z = _zeros_if_none(z0, (b, h, d), fq.float()) + fk.float().sum(2)
        return (num / (fq.float() @ z[..., None] + p.eps)).to(q.dtype), (s, z)
    if not p.normalize:
        o, s = chunked(fq, fk, vv, None, call.scale, s0, p.chunk)
        return o.to(q.dtype), s
    ones = vv.new_ones(b, h, n, 1)
    s_aug = None
    if s0 is not None:
        assert z0 is not None
        s_aug = torch.cat([s0.float(), z0.float()[..., None]], -1)
    o_aug, s_aug = chunked(fq, fk, torch.cat([vv, ones], -1), None, 1.0, s_aug, p.chunk)
    o = o_aug[..., :vd].float() / (o_aug[..., vd:].float() + p.eps)
    return o.to(q.dtype), (s_aug[..., :vd], s_aug[..., vd])


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Any]:
    return _run(q, k, v, call, state, gla_chunk_naive)


def _run_triton(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Any]:
    from attnlab.kernels.linear.op import gla_chunk

    return _run(q, k, v, call, state, gla_chunk)


def _triton_refusal(call: Call) -> list[str]:
    from attnlab.kernels.linear.limits import kernel_refusals

    assert isinstance(call.params, LinearParams)
    extra_col = 1 if call.params.normalize else 0
    return kernel_refusals(call.params.chunk, call.problem.head_dim, call.problem.v_dim + extra_col)


SPEC = MethodSpec(
    name="linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention "
    "(Katharopoulos et al., 2020)",
    summary="linear attention phi(q) (sum phi(k) v^T), phi = elu+1 / relu / identity, optionally normalised",
    param_class=LinearParams,
    reference=reference,
    # non-causal linear attention is two matmuls: the torch_chunk backend runs it
    backends=(triton_chunk(_run_triton, _triton_refusal, patterns=CAUSAL_ONLY), torch_chunk(_run_torch)),
    patterns=SELF_ONLY,
    test_params=({}, {"feature_map": "relu", "normalize": False, "chunk": 16}),
    bench_params=lambda n: [{}],
    stateful=True,
    softmax_normalized=False,
)
