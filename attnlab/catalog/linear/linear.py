"""``linear``: linear attention (Katharopoulos et al., 2020) with a feature map phi, optionally normalised.

Recurrence (fla's ``linear_attn``; phi applied to q and k, as fla's layer does before its op)::

    S_t = S_{t-1} + phi(k_t) v_t^T          S (B, H, K, D_v), float32; K = phi's size (D, F or 2F)
    z_t = z_{t-1} + phi(k_t)                z (B, H, K): the running key sum (normalised only)
    o_t = scale * S_t^T phi(q_t)                                    normalize=False
    o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps)                   normalize=True (scale cancels)

``feature_map``: ``"elu"`` (elu(x) + 1, the paper's), ``"relu"``, ``"identity"`` or ``"hedgehog"``. The normalised form is
the paper's (and fast-transformers', eps = 1e-6); fla's model default is unnormalised (then a per-head
RMSNorm), its ``chunk_linear_attn`` default normalised: say which you compare with. The identity map
with ``normalize=True`` is refused (phi(q) . z can be 0 or negative). relu features can give a row with
phi(q) . z = 0: its output is 0 (numerator 0 over eps).

**Learned maps** (tensor inputs ``map_q``, ``map_k``, each (H, D, F), optional; F free, the same for
both): the weights W_h of a per-head projection applied before the map, ``x -> x W_h``
(``einsum("bhnd,hdf->bhnf")``, no bias; LoLCATs' ``FeatureMapMLP`` layout; its ``feature_dim`` F is 64,
as in the ThunderKittens Hedgehog kernel at D = 128). An absent weight is the identity (F = D), so with
F != D both are needed. Queries take ``map_q``, keys ``map_k`` (after the
keys are repeated to the H query heads of their group: the map is per query head, as in LoLCATs, where
the kv heads are repeated before the map). With ``"relu"`` this is
T2R's relu(x W) (Kasai et al., 2021; T2R's bias omitted), with ``"elu"`` elu(x W) + 1.

**Hedgehog** (Zhang et al., 2024, "The Hedgehog & the Porcupine"): ``y = x W_h``, then
``phi(x) = [softmax(y), softmax(-y)]``, each half a softmax over its F features (2F features in all, so
the state is (B, H, 2F, D_v)). This is the ``softmax_dim`` map of the authors' code (LoLCATs
``feature_map.py``, and the ThunderKittens Hedgehog kernel's PyTorch reference), without their
``clamp(min=eps)`` (a feature underflows to 0 in fp32 only when y spans more than about 100 across the F
features of a token, e.g. [60, -60]: the normalisation then keeps the other features' weight). The paper writes the map as
``[exp(y), exp(-y)]`` (equal up to a per-token factor on each half, which the normalisation does not
cancel), and fla's ``HedgehogFeatureMap`` takes one softmax over ``[2y, -2y]`` jointly: three different
functions, this is the first. Without weights, W_h = I (the map's initialisation in the paper's code and
in fla). Features are computed in float32 and handed to the kernels in q's dtype.

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
from attnlab.catalog.linear._common import (
    CAUSAL_ONLY,
    SELF_ONLY,
    check_finite_input,
    check_state,
    expand_heads,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import InputError
from attnlab.kernels.linear.naive import gla_chunk_naive
from attnlab.params import Params
from attnlab.settings import settings

FEATURE_MAPS = ("elu", "relu", "identity", "hedgehog")
#: The tensor inputs of the learned maps (each (H, D, F), optional; absent = identity).
MAP_INPUTS = ("map_q", "map_k")


@dataclass(frozen=True)
class LinearParams(Params):
    """``feature_map``: "elu" (elu(x)+1, default), "relu", "identity" or "hedgehog" ([softmax(xW),
    softmax(-xW)], 2D features; W from the tensor inputs ``map_q`` / ``map_k``). ``normalize``: divide by
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


def feature_map(x: Tensor, name: str, weight: Tensor | None = None) -> Tensor:
    """phi(x) for x (B, H, N, D): elu(x) + 1, relu(x), x, or Hedgehog's [softmax(y), softmax(-y)] over the
    last dim (2F features), each of x's projection ``y = x W_h`` (F features) when ``weight`` (H, D, F) is
    given (else y = x, F = D). The hedgehog map is computed in float32 and returned in x's dtype; the others in x's dtype."""
    if weight is not None:
        x = torch.einsum("bhnd,hdf->bhnf", x, weight.to(x.dtype))
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    if name == "hedgehog":
        y = x.float()
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1).to(x.dtype)
    return x


def feature_dim(p: LinearParams, f: int) -> int:
    """K, the size of phi(x) (the rows of the state) for F projected features (D without weights): 2F for
    hedgehog, else F."""
    return 2 * f if p.feature_map == "hedgehog" else f


def _weights(d: int, wq: Tensor | None, wk: Tensor | None, check: bool) -> int:
    """F, the maps' output size (D without weights). With ``check``, NaN/Inf weights are refused (one host
    synchronisation each). A single weight with F != D is refused: the other side's identity has D."""
    if check:
        for name, w in (("map_q", wq), ("map_k", wk)):
            if w is not None:
                check_finite_input("linear", name, w)
    if (wq is None) != (wk is None):
        name, w = ("map_q", wq) if wq is not None else ("map_k", wk)
        assert w is not None
        if w.shape[-1] != d:
            raise InputError(
                f"method 'linear': {name} maps D={d} to F={w.shape[-1]} features but "
                f"{'map_k' if name == 'map_q' else 'map_q'} is absent (the identity, F = D = {d}); q and k "
                "need features of the same size: pass both weights"
            )
    w = wq if wq is not None else wk
    return d if w is None else w.shape[-1]


def _states(p: LinearParams, q: Tensor, v: Tensor, state: Any, f: int) -> tuple[Tensor | None, Tensor | None]:
    b, h, _, _ = q.shape
    return check_state("linear", state, b, h, feature_dim(p, f), v.shape[-1], q.device, with_sum=p.normalize)


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
    map_q: Tensor | None = None,
    map_k: Tensor | None = None,
) -> tuple[Tensor, Any]:
    """Token by token (causal) or in one sum (non-causal), as in the module docstring; fp32 when
    ``upcast``. ``map_q``, ``map_k``: the learned maps' weights (H, D, F) or None (identity); NaN/Inf
    weights are refused (InputError) as the chunked backends refuse them (unless
    ``attnlab.settings.check_values`` is off). Returns (o (B, H, N, D_v) in q's dtype, state float32: S,
    or (S, z) when normalised)."""
    b, h, n, d = q.shape
    fw = _weights(d, map_q, map_k, check=settings.check_values)
    s0, z0 = _states(params, q, v, state, fw)
    f = feature_dim(params, fw)
    dt = torch.float32 if upcast else q.dtype
    fq = feature_map(q.to(dt), params.feature_map, map_q)
    fk = feature_map(expand_heads(k, h).to(dt), params.feature_map, map_k)
    vv = expand_heads(v, h).to(dt)
    s = _zeros_if_none(s0, (b, h, f, v.shape[-1]), fq)
    z = _zeros_if_none(z0, (b, h, f), fq)
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


#: Key features per launch of the Triton kernels (more are split in slices of this many: the unnormalised
#: recurrence is a sum over feature slices; at K = 256 a chunk kernel asks more shared memory than an H100
#: has, seen on the GPU with Hedgehog's 2 x 128 features).
K_SLICE = 128


def _sliced(chunked: Any, fq: Tensor, fk: Tensor, v: Tensor, scale: float, s0: Tensor | None, chunk: int,
            k_slice: int | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``chunked`` on feature slices of at most ``k_slice`` (None: whole), outputs summed (float32 when
    sliced), states concatenated along the features."""
    f = fq.shape[-1]
    if k_slice is None or f <= k_slice:
        return chunked(fq, fk, v, None, scale, s0, chunk)
    outs, states = [], []
    for a in range(0, f, k_slice):
        sl = slice(a, a + k_slice)
        part = None if s0 is None else s0[..., sl, :].contiguous()
        o, st = chunked(fq[..., sl].contiguous(), fk[..., sl].contiguous(), v, None, scale, part, chunk)
        outs.append(o.float())
        states.append(st)
    return torch.stack(outs).sum(0), torch.cat(states, -2)


def _run(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, chunked: Any,
    k_slice: int | None = None, triton: bool = False,
) -> tuple[Tensor, Any]:  # fmt: skip
    """Shared by both backends: phi, then the unnormalised chunked recurrence ``chunked`` (on feature slices
    of ``k_slice``); the normalised form divides its output by phi(q_t) . z_t, z_t the running key sum made
    by a float32 cumsum over the tokens (its last row is the state's z). ``triton``: ``chunked`` is the
    Triton op, whose backward is checked here against the real feature width (:func:`backward_fallback`):
    when its state tile would not fit, this call runs ``gla_chunk_naive`` (torch_chunk's path) instead."""
    p = call.params
    assert isinstance(p, LinearParams)
    b, h, _, d = q.shape
    vd = v.shape[-1]
    wq, wk = extra.get("map_q"), extra.get("map_k")
    fw = _weights(d, wq, wk, check=settings.check_values)  # (off: no host synchronisation)
    s0, z0 = _states(p, q, v, state, fw)
    f = feature_dim(p, fw)
    fq = feature_map(q, p.feature_map, wq)
    fk = feature_map(expand_heads(k, h), p.feature_map, wk)
    vv = expand_heads(v, h)
    if not call.problem.causal:  # two matmuls in fp32
        s = _zeros_if_none(s0, (b, h, f, vd), fq.float()) + fk.float().transpose(-1, -2) @ vv.float()
        num = fq.float() @ s
        if not p.normalize:
            return (call.scale * num).to(q.dtype), s
        z = _zeros_if_none(z0, (b, h, f), fq.float()) + fk.float().sum(2)
        return (num / (fq.float() @ z[..., None] + p.eps)).to(q.dtype), (s, z)
    scale = call.scale if not p.normalize else 1.0
    if triton and backward_fallback(f, vd, fq.dtype, _needs_grad(fq, fk, vv, s0)):
        chunked, k_slice = gla_chunk_naive, None  # (the same results, by torch_chunk's path)
    o, s = _sliced(chunked, fq, fk, vv, scale, s0, p.chunk, k_slice)
    if not p.normalize:
        return o.to(q.dtype), s
    zc = fk.float().cumsum(2)
    if z0 is not None:
        zc = zc + z0.float()[:, :, None, :]
    den = (fq.float() * zc).sum(-1, keepdim=True)
    return (o.float() / (den + p.eps)).to(q.dtype), (s, zc[:, :, -1])


def _run_torch(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Any]:
    return _run(q, k, v, call, extra, state, gla_chunk_naive)


def _run_triton(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
) -> tuple[Tensor, Any]:
    from attnlab.kernels.linear.op import gla_chunk

    return _run(q, k, v, call, extra, state, gla_chunk, K_SLICE, triton=True)


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def backward_fallback(k_dim: int, v_dim: int, dtype: torch.dtype, grad: bool) -> list[str]:
    """Why the Triton backend's runner takes torch_chunk's path for a call whose features phi(x) have
    ``k_dim`` = K columns (D, F or 2F: the learned maps' width, known only from their weights), values
    ``v_dim``, in ``dtype``, with ``grad`` (the chunk op's inputs need gradients): the chunked backward
    holds a (min(K, K_SLICE), V) state tile (feature slices of ``K_SLICE``) that would exceed the
    shared memory (``limits.backward_refusals``). Empty: the Triton kernels run."""
    if not grad:
        return []
    from attnlab.kernels.linear.limits import backward_refusals

    return backward_refusals(min(k_dim, K_SLICE), v_dim, dtype, per_channel=False)


def _triton_refusal(call: Call) -> list[str]:
    """The Triton kernels' limits on the chunk size and head dims, and float16 with ``normalize``. The
    backward's state tile is not refused here: its rows are the features of phi, whose number F (2F for
    hedgehog) the learned maps' weights set, and a refusal sees the call's shapes, not its tensor inputs
    (D would stand for F: wrong both ways, a map to more features than D passing and one to fewer refused).
    The runner checks the real width (:func:`backward_fallback`) and runs a call whose tile would not fit
    by torch_chunk's path (the same results, float32 accumulation, autograd backward)."""
    from attnlab.kernels.linear.limits import kernel_refusals

    assert isinstance(call.params, LinearParams)
    # (F is not known before the tensors: D stands for it; more than K_SLICE features are sliced, so the
    # forward's tiles always fit)
    k_dim = min(feature_dim(call.params, call.problem.head_dim), K_SLICE)
    p = call.problem
    return kernel_refusals(call.params.chunk, k_dim, p.v_dim)


def _triton_dtype_refusal(params: Params, dtype: torch.dtype) -> list[str]:
    """``normalize=True`` in float16: the chunk op returns the unnormalised numerator in q's dtype, which
    grows with the length (in float16 it passed 65504, inf, near 1K tokens); torch_chunk divides in
    float32 and takes the call."""
    assert isinstance(params, LinearParams)
    if params.normalize and dtype == torch.float16:
        return [
            "normalize=True in float16: the kernel's unnormalised output overflows float16 (use bfloat16)"
        ]
    return []


def sample_map(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A learned map's weights near its initialisation: the (D, F) identity (ones on the diagonal) plus
    N(0, 0.25 / D), per head (shape (H, D, F))."""
    d, f = shape[-2], shape[-1]
    return torch.eye(d, f).expand(shape) + 0.5 * d**-0.5 * torch.randn(shape, generator=generator)


SPEC = MethodSpec(
    name="linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention "
    "(Katharopoulos et al., 2020)",
    summary="linear attention phi(q) (sum phi(k) v^T), phi = elu+1 / relu / identity / Hedgehog's learned "
    "map (weights as inputs), optionally normalised",
    param_class=LinearParams,
    reference=reference,
    # non-causal linear attention is two matmuls: the torch_chunk backend runs it
    backends=(
        triton_chunk(_run_triton, _triton_refusal, patterns=CAUSAL_ONLY, dtype_refusal=_triton_dtype_refusal),
        torch_chunk(_run_torch),
    ),
    patterns=SELF_ONLY,
    test_params=(
        {},
        {"feature_map": "relu", "normalize": False, "chunk": 16},
        {"feature_map": "hedgehog", "chunk": 32},
    ),
    inputs=(
        TensorInput(
            "map_q",
            ("H", "D", "F"),
            "weights of the queries' learned map x -> x W_h before phi (Hedgehog, T2R); absent: identity",
            required=False,
            sample=sample_map,
        ),
        TensorInput(
            "map_k",
            ("H", "D", "F"),
            "weights of the keys' learned map (per query head, after the kv heads are repeated); absent: identity",
            required=False,
            sample=sample_map,
        ),
    ),
    bench_params=lambda n: [{}],
    stateful=True,
    softmax_normalized=False,
)
