"""Validation of q, k, v: the checks every call makes before dispatch, and the messages users see.

Layout is (batch, heads, seq, head_dim), like ``torch.nn.functional.scaled_dot_product_attention``:
``q`` is (B, H, N_q, D), ``k`` is (B, H_kv, N_k, D), ``v`` is (B, H_kv, N_k, D_v), with ``H % H_kv == 0``
(grouped-query attention when ``H_kv < H``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from attnlab.core import FLOAT_DTYPES, Problem, TensorInput
from attnlab.errors import InputError

SUPPORTED_DTYPES = FLOAT_DTYPES


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    check_finite: bool = False,
) -> Problem:
    """Check q, k, v and return their Problem; raise InputError naming what was given and expected.

    ``check_finite`` also scans the inputs for NaN/Inf (:func:`check_finite_values`; a host
    synchronisation, so off by default).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(
                f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape {_shape(t)} "
                f"({t.dim()} dims). Add the missing dims, e.g. {name}[None] for a single sequence, or "
                "transpose a (batch, seq, heads, dim) tensor with .transpose(1, 2)."
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if not isinstance(causal, bool):
        raise InputError(f"causal must be a bool, got {causal!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(
            f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them, "
            "e.g. k.to(q.dtype)"
        )
    if not (q.device == k.device == v.device):
        raise InputError(
            f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    b, h, n_q, d = q.shape
    bk, h_kv, n_k, dk = k.shape
    bv, h_v, n_v, d_v = v.shape
    if not (b == bk == bv):
        raise InputError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; dim 0 must match")
    if h_kv != h_v or n_k != n_v:
        raise InputError(
            f"k {_shape(k)} and v {_shape(v)} must have the same heads (dim 1) and length (dim 2)"
        )
    if d != dk:
        raise InputError(f"q and k head dims differ: q {_shape(q)} has D={d}, k {_shape(k)} has D={dk}")
    if h_kv == 0 or h == 0 or h % h_kv != 0:
        raise InputError(
            f"q has {h} heads and k/v have {h_kv}: grouped-query attention needs H % H_kv == 0 "
            f"(H_kv a divisor of H, e.g. {', '.join(str(x) for x in _divisors(h)) or 'none'})"
        )
    if n_q == 0 or n_k == 0:
        raise InputError(
            f"empty sequence: N_q={n_q}, N_k={n_k} (q {_shape(q)}, k {_shape(k)}); both lengths must be >= 1"
        )
    if b == 0 or d == 0 or d_v == 0:
        raise InputError(f"empty batch or head dim: q {_shape(q)}, v {_shape(v)}")
    check_scale(scale)
    if check_finite:
        check_finite_values({"q": q, "k": k, "v": v})
    requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return Problem(
        batch=b,
        heads=h,
        kv_heads=h_kv,
        n_q=n_q,
        n_k=n_k,
        head_dim=d,
        v_dim=d_v,
        causal=causal,
        dtype=q.dtype,
        device=q.device,
        requires_grad=requires_grad,
    )


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def check_finite_values(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise InputError if a floating tensor holds NaN/Inf. One reduction per tensor and a host synchronisation:
    opt-in (``check_finite=True``, ``attnlab.settings.check_finite`` or ``ATTNLAB_CHECK_FINITE=1``).
    Skipped inside ``torch.compile`` (a data-dependent check would break the graph)."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:  # bool and int inputs (masks, offsets) hold no NaN
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(
                f"{name} contains {bad} NaN/Inf value(s); attention of non-finite inputs is undefined. "
                "Fix the producer, or turn the check off (check_finite=False, the default)."
            )


#: signatures (declared inputs, problem, each given tensor's shape, dtype and device) that passed
#: :func:`validate_extra`: a decode loop passes the same shapes every step, and the check is a pure
#: function of them (bounded: cleared when full)
_VALID: dict[tuple[Any, ...], None] = {}
_VALID_MAX = 512


def _signature(
    declared: tuple[TensorInput, ...], given: Mapping[str, Any], problem: Problem
) -> tuple[Any, ...] | None:
    """The cache key of a :func:`validate_extra` call, or None when it must run in full (a given value
    that is not a tensor, or tracing, where shapes may be symbolic)."""
    if torch.compiler.is_compiling():
        return None
    parts: list[Any] = [declared, problem]
    for spec in declared:
        t = given.get(spec.name)
        if t is None:
            parts.append(None)
        elif type(t) in (torch.Tensor, torch.nn.Parameter):  # (not subclasses: fake, symbolic, DTensor)
            parts.append((tuple(t.shape), t.dtype, t.device))
        else:
            return None
    return tuple(parts)


#: given-tensor signatures one call's memo keeps (:func:`validate_extra` with ``memo``; cleared when full)
_MEMO_VALID_MAX = 64


def _given_signature(declared: tuple[TensorInput, ...], given: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Each declared input's (shape, dtype, device) as given (None where absent); None when the check
    must run in full (a given value that is not a plain tensor, or tracing)."""
    if torch.compiler.is_compiling():
        return None
    parts: list[Any] = []
    for spec in declared:
        t = given.get(spec.name)
        if t is None:
            parts.append(None)
        elif type(t) in (torch.Tensor, torch.nn.Parameter):  # (not subclasses: fake, symbolic, DTensor)
            parts.append((t.shape, t.dtype, t.device))
        else:
            return None
    return tuple(parts)


def validate_extra(
    declared: tuple[TensorInput, ...],
    given: Mapping[str, Any],
    problem: Problem,
    method: str,
    memo: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Check the tensors a method takes beside q, k, v (declared by the method) against the call's sizes;
    raise InputError naming what was given and expected. Returns them by name (absent optional ones left
    out). A signature that passed before (same declared inputs, problem, shapes, dtypes and devices) is
    not checked again. ``memo``: a resolved call's memo (``Call.memo``), where the signatures that passed
    for this ``declared`` and ``problem`` (by identity) are kept, so a repeated call hashes only the
    given tensors' shapes, dtypes and devices."""
    if memo is not None:
        parts = _given_signature(declared, given)
        if parts is None:
            return _validate_extra(declared, given, problem, method)
        seen = memo.get("validate_extra")
        if seen is None or seen[0] is not problem or seen[1] is not declared:
            seen = (problem, declared, set[tuple[Any, ...]]())
            memo["validate_extra"] = seen
        if parts in seen[2]:
            return {spec.name: given[spec.name] for spec in declared if given.get(spec.name) is not None}
        out = _validate_extra(declared, given, problem, method)
        if len(seen[2]) >= _MEMO_VALID_MAX:
            seen[2].clear()
        seen[2].add(parts)
        return out
    key = _signature(declared, given, problem)
    if key is not None and key in _VALID:
        return {spec.name: given[spec.name] for spec in declared if given.get(spec.name) is not None}
    out = _validate_extra(declared, given, problem, method)
    if key is not None:
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()
        _VALID[key] = None
    return out


def _validate_extra(
    declared: tuple[TensorInput, ...], given: Mapping[str, Any], problem: Problem, method: str
) -> dict[str, torch.Tensor]:
    sizes = problem.symbols()
    out: dict[str, torch.Tensor] = {}
    bound: dict[str, str] = {}  # free symbol -> the input that fixed its size
    for spec in declared:
        t = given.get(spec.name)
        if t is None:
            if spec.required:
                raise InputError(
                    f"method {method!r} needs the tensor input {spec.describe()}; pass {spec.name}=..."
                )
            continue
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{spec.name} must be a torch.Tensor, got {type(t).__name__}")
        want = spec.expected(sizes)
        ok = t.dim() == len(want) and all(
            g == w or w == -1 or (spec.broadcast and g == 1) for g, w in zip(t.shape, want, strict=True)
        )
        if not ok:
            names = ", ".join(
                (f"{s}={sizes[s]}" if s in sizes else s) if isinstance(s, str) else str(s) for s in spec.shape
            )
            where = f" (free sizes fixed by {', '.join(sorted(set(bound.values())))})" if bound else ""
            raise InputError(
                f"{spec.name} has shape {_shape(t)}; method {method!r} expects ({names})"
                + (" where any dim may be 1" if spec.broadcast else "")
                + where
            )
        for sym, size in zip(spec.shape, t.shape, strict=True):
            if isinstance(sym, str) and sym not in sizes:
                sizes[sym] = size
                bound[sym] = spec.name
        if spec.kind == "bool" and t.dtype != torch.bool:
            raise InputError(f"{spec.name} has dtype {t.dtype}; expected torch.bool (convert with .bool())")
        if spec.kind == "int" and t.dtype not in (torch.int32, torch.int64):
            raise InputError(f"{spec.name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
        if spec.kind == "float" and (
            not t.dtype.is_floating_point or (spec.same_dtype and t.dtype != problem.dtype)
        ):
            want_dt = str(problem.dtype) if spec.same_dtype else "a floating dtype"
            hint = f" (convert with .to({problem.dtype}))" if not t.dtype.is_floating_point else ""
            raise InputError(f"{spec.name} has dtype {t.dtype}; expected {want_dt}{hint}")
        if t.device != problem.device:
            raise InputError(f"{spec.name} is on {t.device}, but q, k, v are on {problem.device}")
        out[spec.name] = t
    return out


def check_scale(scale: object) -> None:
    """Refuse a ``scale`` that is not a positive finite number or None (the default 1/sqrt(D))."""
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise InputError(f"scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
