"""Validation of q, k, v: the checks every call makes before dispatch, and the messages users see.

Layout is (batch, heads, seq, head_dim), like ``torch.nn.functional.scaled_dot_product_attention``:
``q`` is (B, H, N_q, D), ``k`` is (B, H_kv, N_k, D), ``v`` is (B, H_kv, N_k, D_v), with ``H % H_kv == 0``
(grouped-query attention when ``H_kv < H``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.errors import InputError
from attnlab.patterns import Pattern, pattern_of

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Problem:
    """The shape of one attention call: everything a backend needs to decide whether it can run it."""

    batch: int
    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    v_dim: int
    causal: bool
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Position of query 0 in key coordinates (bottom-right alignment): ``N_k - N_q``."""
        return self.n_k - self.n_q

    @property
    def pattern(self) -> Pattern:
        return pattern_of(self.causal, self.n_q, self.n_k)

    @property
    def dense_elements(self) -> int:
        """Elements of the full score matrix over all heads: B * H * N_q * N_k."""
        return self.batch * self.heads * self.n_q * self.n_k

    def describe(self) -> str:
        return (
            f"q (B={self.batch}, H={self.heads}, N_q={self.n_q}, D={self.head_dim}), "
            f"k/v (H_kv={self.kv_heads}, N_k={self.n_k}, D_v={self.v_dim}), {self.dtype}, "
            f"{self.device}, {self.pattern.value}"
        )


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    check_finite: bool = True,
) -> Problem:
    """Check q, k, v and return their Problem; raise InputError naming what was given and expected.

    ``check_finite`` scans the inputs for NaN/Inf (one reduction per tensor); pass False to skip it
    for speed. It is skipped inside ``torch.compile`` (a data-dependent check would break the graph).
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
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise InputError(f"scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
    if check_finite and not torch.compiler.is_compiling():
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InputError(
                    f"{name} contains {bad} NaN/Inf value(s); attention of non-finite inputs is undefined. "
                    "Fix the producer, or pass check_finite=False to skip this check."
                )
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


def default_scale(problem: Problem, scale: float | None) -> float:
    """The softmax scale: ``scale`` if given, else ``1 / sqrt(D)``."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(problem.head_dim)
