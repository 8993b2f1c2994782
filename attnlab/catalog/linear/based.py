"""``based``: Based (Arora et al., 2024): linear attention with the 2nd-order Taylor feature map, and exact
sliding-window softmax, the two mixers of the Based architecture.

The paper combines them as **layers**, not inside one layer (its reference configs put linear attention
and sliding-window layers at different depths, gated short convolutions elsewhere); ``mixer`` picks one:

- ``mixer="taylor"`` (default): phi(x) = [1, sqrt(s) x, s vec(x x^T) / sqrt(2)] with s = ``scale``
  (default 1/sqrt(D); Based's map [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))] is s = 1/sqrt(d)), so
  ``phi(q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2``, the Taylor expansion of exp(s q.k), always >= 1/2.
  1 + D + D^2 features (273 for Based's D = 16; q and k may have a smaller D than v; D <= 64).
  Normalised::

      S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
      o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps)            eps = 1e-12 (Based's linear path)

  State: the pair (S (B, H, F, D_v), z (B, H, F)), F = 1 + D + D^2, float32.
- ``mixer="window"``: softmax attention of each query over the ``window`` most recent keys, itself
  included (Based's ``SlidingAttention(window_size=W)`` calls flash-attn with window (W//2, 0): that is
  ``window = W // 2 + 1`` here). State: the pair (k_tail, v_tail) of the last ``window - 1`` keys and
  values seen (B, H_kv, L, D), L <= window - 1, in the input dtype; a call continues after them.

Causal self-attention only. GQA: k and v are shared by a group's query heads; the Taylor state is per
query head, the window state per kv head (it holds keys and values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.linear_chunk import torch_chunk
from attnlab.catalog.linear._common import CAUSAL_ONLY, check_state, check_tensor_state, expand_heads
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.kernels.linear.naive import gla_chunk_naive
from attnlab.params import Params
from attnlab.reference import masked_softmax_attention

MIXERS = ("taylor", "window")


@dataclass(frozen=True)
class BasedParams(Params):
    """``mixer``: "taylor" (linear attention with the Taylor map, default) or "window" (sliding-window
    softmax). ``window``: keys per query for the window mixer, self included (default 65: Based's W=128).
    ``eps``: the Taylor mixer's denominator guard (default 1e-12). ``chunk``: tokens per chunk (default 64)."""

    method = "based"
    mixer: str = "taylor"
    window: int = 65
    eps: float = 1e-12
    chunk: int = 64

    def validate(self) -> None:
        if self.mixer not in MIXERS:
            raise self._fail("mixer", self.mixer, f"one of {', '.join(MIXERS)}")
        self.check_int("window", minimum=1)
        self.check_float("eps", positive=True)
        self.check_int("chunk", minimum=1)

    def head_dim_limit(self) -> int | None:
        """The largest q/k head dim these parameters take (None: any): ``MAX_TAYLOR_DIM`` under the Taylor
        mixer (1 + D + D^2 features), none for the window mixer. Backends refuse larger calls with this
        reason; a parity harness can skip such cases by asking it."""
        return MAX_TAYLOR_DIM if self.mixer == "taylor" else None


def taylor_map(x: Tensor, scale: float) -> Tensor:
    """phi(x) = [1, sqrt(s) x, s vec(x x^T) / sqrt(2)]: (..., D) -> (..., 1 + D + D^2)."""
    d = x.shape[-1]
    xs = x * scale**0.5
    outer = (xs[..., :, None] * xs[..., None, :]).reshape(*x.shape[:-1], d * d) / 2**0.5
    return torch.cat([torch.ones_like(x[..., :1]), xs, outer], -1)


def _need_causal(causal: bool) -> None:
    if not causal:
        raise UnsupportedPatternError("method 'based' is causal: call it with causal=True")


#: The largest q/k head dim the Taylor mixer takes: 1 + 64 + 64^2 = 4161 features (Based uses D = 16).
MAX_TAYLOR_DIM = 64


def _taylor_state(q: Tensor, v: Tensor, state: Any) -> tuple[Tensor | None, Tensor | None]:
    b, h, _, d = q.shape
    if d > MAX_TAYLOR_DIM:
        raise InputError(
            f"method 'based' (mixer='taylor'): q and k have D={d}, so the Taylor map has 1 + D + D^2 = "
            f"{1 + d + d * d} features per token; it takes D <= {MAX_TAYLOR_DIM}. Based projects q and k to "
            "a small feature dim (16) and keeps v at the head dim: pass q, k of shape (B, H, N, 16)"
        )
    return check_state("based", state, b, h, 1 + d + d * d, v.shape[-1], q.device, with_sum=True)


def _window_state(k: Tensor, v: Tensor, state: Any, window: int) -> tuple[Tensor, Tensor] | None:
    if state is None:
        return None
    if not (isinstance(state, tuple | list) and len(state) == 2 and isinstance(state[0], Tensor)):
        raise InputError(
            "method 'based' (mixer='window') carries the state (k_tail, v_tail), the last window - 1 keys "
            f"and values; got {type(state).__name__}"
        )
    b, h_kv, _, d = k.shape
    tail = state[0].shape[2] if state[0].dim() == 4 else -1
    if not 0 <= tail <= window - 1:
        raise InputError(
            f"method 'based': the window state's keys have shape {tuple(state[0].shape)}; expected "
            f"(B={b}, H_kv={h_kv}, L, D={d}) with L <= window - 1 = {window - 1}"
        )
    kt = check_tensor_state("based", "state k_tail", state[0], (b, h_kv, tail, d), k.device)
    vt = check_tensor_state("based", "state v_tail", state[1], (b, h_kv, tail, v.shape[-1]), k.device)
    return kt.to(k.dtype), vt.to(v.dtype)


def _window(
    q: Tensor, k: Tensor, v: Tensor, params: BasedParams, scale: float, state: Any, upcast: bool
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Softmax over the ``window`` most recent keys (self included), after the state's tail keys."""
    tail = _window_state(k, v, state, params.window)
    kk, vv = (k, v) if tail is None else (torch.cat([tail[0], k], 2), torch.cat([tail[1], v], 2))
    n, m = q.shape[2], kk.shape[2]
    pos = torch.arange(n, device=q.device)[:, None] + (m - n)
    key = torch.arange(m, device=q.device)[None, :]
    mask = (key <= pos) & (key > pos - params.window)
    out = masked_softmax_attention(q, kk, vv, scale=scale, mask=mask, upcast=upcast)
    keep = min(params.window - 1, m)
    return out, (kk[:, :, m - keep :], vv[:, :, m - keep :])


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: BasedParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
) -> tuple[Tensor, Any]:
    """Taylor mixer token by token (normalised linear attention with the Taylor map), or the window
    mixer's masked softmax, as in the module docstring; fp32 when ``upcast``. Returns (o in q's dtype,
    state)."""
    _need_causal(causal)
    if params.mixer == "window":
        return _window(q, k, v, params, scale, state, upcast)
    s0, z0 = _taylor_state(q, v, state)
    dt = torch.float32 if upcast else q.dtype
    b, h, n, _ = q.shape
    fq = taylor_map(q.to(dt), scale)
    fk = taylor_map(expand_heads(k, h).to(dt), scale)
    vv = expand_heads(v, h).to(dt)
    s = fq.new_zeros(b, h, fq.shape[-1], v.shape[-1]) if s0 is None else s0.to(dt)
    z = fq.new_zeros(b, h, fq.shape[-1]) if z0 is None else z0.to(dt)
    outs = []
    for t in range(n):
        s = s + fk[:, :, t, :, None] * vv[:, :, t, None, :]
        z = z + fk[:, :, t]
        num = torch.einsum("bhf,bhfv->bhv", fq[:, :, t], s)
        outs.append(num / ((fq[:, :, t] * z).sum(-1, keepdim=True) + params.eps))
    return torch.stack(outs, 2).to(q.dtype), (s.float(), z.float())


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Any]:
    p = call.params
    assert isinstance(p, BasedParams)
    if p.mixer == "window":
        return _window(q, k, v, p, call.scale, state, upcast=True)
    s0, z0 = _taylor_state(q, v, state)
    b, h, n, _ = q.shape
    vd = v.shape[-1]
    fq = taylor_map(q.float(), call.scale)
    fk = taylor_map(expand_heads(k, h).float(), call.scale)
    vv = expand_heads(v, h).float()
    s_aug = None if s0 is None else torch.cat([s0.float(), z0.float()[..., None]], -1)  # type: ignore[union-attr]
    o_aug, s_aug = gla_chunk_naive(
        fq, fk, torch.cat([vv, vv.new_ones(b, h, n, 1)], -1), None, 1.0, s_aug, p.chunk
    )
    o = o_aug[..., :vd] / (o_aug[..., vd:] + p.eps)
    return o.to(q.dtype), (s_aug[..., :vd], s_aug[..., vd])


def _refusal(call: Call) -> list[str]:
    """The Taylor mixer's head-dim limit, declared before any work (the runner's InputError says the same)."""
    assert isinstance(call.params, BasedParams)
    limit = call.params.head_dim_limit()
    d = call.problem.head_dim
    if limit is None or d <= limit:
        return []
    return [
        f"mixer='taylor' takes q/k head dims up to {limit} (1 + D + D^2 = {1 + d + d * d} features at D={d}); "
        "Based projects q and k to D = 16"
    ]


SPEC = MethodSpec(
    name="based",
    family="linear",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (Arora et al., 2024)",
    summary="Based's mixers: Taylor-map linear attention (normalised) or exact sliding-window softmax",
    param_class=BasedParams,
    reference=reference,
    backends=(torch_chunk(_run_torch, _refusal),),
    patterns=CAUSAL_ONLY,
    test_params=({}, {"mixer": "window", "window": 5}),
    bench_params=lambda n: [{}, {"mixer": "window"}],
    stateful=True,
    softmax_normalized=False,
)
