"""The public entry point: ``attnlab.attention(q, k, v, method=..., **params)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnlab.backends.base import Call
from attnlab.dispatch import Choice, choose, require
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.inputs import default_scale, validate
from attnlab.registry import get


def resolve(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    check_finite: bool = True,
    **params: Any,
) -> Call:
    """Validate a call and resolve its method and parameters (everything but the backend choice)."""
    spec = get(method)
    problem = validate(q, k, v, causal=causal, scale=scale, check_finite=check_finite)
    if problem.pattern not in spec.patterns:
        allowed = ", ".join(sorted(p.value for p in spec.patterns))
        raise UnsupportedPatternError(
            f"method {spec.name!r} does not define the {problem.pattern.value} pattern (N_q={problem.n_q}, "
            f"N_k={problem.n_k}, causal={causal}); it supports: {allowed}"
        )
    if problem.group > 1 and not spec.gqa:
        raise InputError(
            f"method {spec.name!r} does not support grouped-query attention (q has {problem.heads} heads, "
            f"k/v {problem.kv_heads}); repeat k/v heads with k.repeat_interleave({problem.group}, dim=1)"
        )
    return Call(spec, spec.make_params(params), problem, default_scale(problem, scale))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    check_finite: bool = True,
    **params: Any,
) -> Tensor:
    """Attention of ``q`` over ``k``/``v`` by ``method``; returns (B, H, N_q, D_v) in the input dtype.

    Args:
        q: (B, H, N_q, D) queries. k: (B, H_kv, N_k, D) keys. v: (B, H_kv, N_k, D_v) values.
            ``H % H_kv == 0`` (grouped-query attention when ``H_kv < H``); float32, bfloat16 or float16.
        method: a registered method name (``attnlab list`` shows them and their parameters).
        causal: query ``i`` sees keys ``j <= i + N_k - N_q`` (bottom-right alignment when N_q != N_k).
        scale: multiplier of ``q . k`` (default ``1 / sqrt(D)``).
        backend: force one backend by name (``"reference"`` runs the fp32 reference); default: the
            first of the method's backends, in priority order, that can run this call.
        check_finite: scan inputs for NaN/Inf first (skipped inside ``torch.compile``).
        **params: the method's parameters (e.g. ``window=1024`` for ``sliding_window``).

    Rows with no allowed key return zeros, never NaN.
    """
    call = resolve(q, k, v, method=method, causal=causal, scale=scale, check_finite=check_finite, **params)
    return require(call, backend).run(q, k, v, call)


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    backend: str | None = None,
    **params: Any,
) -> Choice:
    """Which backend ``attention`` would run for these inputs, and why the ones before it refused."""
    call = resolve(q, k, v, method=method, causal=causal, check_finite=False, **params)
    return choose(call, backend)
