"""The callables the efficiency benchmark times, built the same way for every side.

- :func:`dense_fn`: the dense baseline and its peers, ``F.scaled_dot_product_attention`` restricted to one
  SDPA kernel (cuDNN, flash, mem-efficient) or PyTorch's own choice (``None``, the CPU baseline).
- :func:`as_called_fn`: a method as a user calls it, ``attnlab.attention(q, k, v, method=..., causal=...,
  backend=..., **params)`` with every other argument at its default (input checks included).
- :func:`kernel_fn`: the same backend's executor without the API's validation and dispatch: the call is
  resolved once, outside the timed loop, and only ``backend.run`` is timed.

:func:`timed` wraps any of them for a mode: ``fwd`` runs under ``torch.no_grad()``; ``fwd_bwd`` runs the
forward and ``torch.autograd.grad`` of its output with a fixed output gradient, for every side alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.bench.config import BenchConfig
from attnlab.kernels.sdpa import sdpa_dense


@dataclass(frozen=True)
class Inputs:
    """Random q (B, H, N_q, D), k, v (B, H_kv, N_k, D) and the output gradient (B, H, N_q, D)."""

    q: Tensor
    k: Tensor
    v: Tensor
    dout: Tensor

    @staticmethod
    def make(cfg: BenchConfig, n_q: int, n_k: int, grad: bool) -> Inputs:
        """The same tensors for the same (config, shapes): generated on CPU from ``cfg.seed``."""
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        dev, dt = cfg.torch_device, cfg.torch_dtype

        def make(h: int, n: int) -> Tensor:
            x = torch.randn(cfg.batch, h, n, cfg.head_dim, generator=g)
            return x.to(dev, dt).requires_grad_(grad)

        q, k, v = make(cfg.heads, n_q), make(cfg.n_kv_heads, n_k), make(cfg.n_kv_heads, n_k)
        dout = torch.randn(cfg.batch, cfg.heads, n_q, cfg.head_dim, generator=g).to(dev, dt)
        return Inputs(q, k, v, dout)


Forward = Callable[[], Tensor]


def timed(fn: Forward, mode: str, x: Inputs) -> Callable[[], Any]:
    """``fn`` as one timed call of ``mode`` ("fwd" or "fwd_bwd")."""
    if mode == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return fn()

        return fwd

    def fwd_bwd() -> Any:
        return torch.autograd.grad(fn(), (x.q, x.k, x.v), x.dout)

    return fwd_bwd


def dense_fn(x: Inputs, causal: bool, kernel: SDPBackend | None) -> Forward:
    """Dense softmax attention by SDPA, restricted to ``kernel`` (None: PyTorch's choice)."""
    kernels = [kernel] if kernel is not None else None
    scale = x.q.shape[-1] ** -0.5
    return lambda: sdpa_dense(x.q, x.k, x.v, causal=causal, scale=scale, kernels=kernels)


def method_inputs(x: Inputs, method: str, seed: int = 0) -> dict[str, Tensor]:
    """The method's required tensor inputs at the shapes of ``x`` (see :func:`required_inputs`)."""
    return required_inputs(method, x.q, x.k, x.v, seed)


def required_inputs(method: str, q: Tensor, k: Tensor, v: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """The method's required tensor inputs (gates, beta, ...) at these shapes, drawn by their declared
    samplers (valid values), in q's dtype and device; the same for the same (shapes, seed)."""
    spec = attnlab.get(method)
    if not spec.inputs:
        return {}
    b, h, n_q, d = q.shape
    sizes = {"B": b, "H": h, "H_kv": k.shape[1], "N_q": n_q, "N_k": k.shape[2], "D": d, "D_v": v.shape[3]}
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    return {t.name: t.random(sizes, g, device=q.device, dtype=q.dtype) for t in spec.inputs if t.required}


def output_of(out: Any) -> Tensor:
    """The output tensor of a call (a stateful method returns a Result; its state is not timed apart)."""
    return out.out if isinstance(out, attnlab.Result) else out


def as_called_fn(x: Inputs, method: str, causal: bool, backend: str, params: dict[str, Any]) -> Forward:
    """``attnlab.attention`` with this backend forced and every other argument at its default (required
    tensor inputs drawn once, outside the timed call)."""
    extra = method_inputs(x, method)
    if not extra and not attnlab.get(method).stateful:
        return lambda: attnlab.attention(
            x.q, x.k, x.v, method=method, causal=causal, backend=backend, **params
        )
    kwargs: dict[str, Any] = {**params, **extra}
    return lambda: output_of(
        attnlab.attention(x.q, x.k, x.v, method=method, causal=causal, backend=backend, **kwargs)
    )


def kernel_fn(x: Inputs, method: str, causal: bool, backend: str, params: dict[str, Any]) -> Forward:
    """The backend's executor alone: a prepared op resolves the call (validation, parameters, dispatch,
    the plan) once, here, and :meth:`attnlab.Op.bind` returns the bare backend call."""
    op = attnlab.prepare(method, causal=causal, backend=backend, **params)
    fn: Forward = op.bind(x.q, x.k, x.v, **method_inputs(x, method))
    return fn
