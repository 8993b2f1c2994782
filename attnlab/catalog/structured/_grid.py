"""What the grid-shaped static patterns share: per-axis parameters, the token grid of a call, raster order.

A sequence of ``N`` tokens laid out on a grid ``shape = (L_0, ..., L_{n-1})`` (``prod(shape) == N``) is in
raster order: the last axis varies fastest, token ``t`` sits at ``c_a = (t // P_a) % L_a`` with
``P_a = L_{a+1} * ... * L_{n-1}`` (NATTEN's and PyTorch's ``reshape`` order).
"""

from __future__ import annotations

import math
from typing import Any

from attnlab.errors import InputError, ParamError


def per_axis(method: str, name: str, value: Any, n_axes: int, *, minimum: int = 1) -> tuple[int, ...]:
    """``value`` (an int for every axis, or one int per axis) as a tuple of ``n_axes`` ints >= ``minimum``."""
    values = (value,) * n_axes if isinstance(value, int) and not isinstance(value, bool) else value
    ok = (
        isinstance(values, tuple)
        and len(values) == n_axes
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in values)
    )
    if not ok:
        raise ParamError(
            f"method {method!r}: parameter {name}={value!r} is invalid; expected an integer >= {minimum} "
            f"or a tuple of {n_axes} such integers (one per axis of the grid)"
        )
    return values


def per_axis_bool(method: str, name: str, value: Any, n_axes: int) -> tuple[bool, ...]:
    """``value`` (a bool for every axis, or one bool per axis) as a tuple of ``n_axes`` bools."""
    values = (value,) * n_axes if isinstance(value, bool) else value
    if not (isinstance(values, tuple) and len(values) == n_axes and all(isinstance(x, bool) for x in values)):
        raise ParamError(
            f"method {method!r}: parameter {name}={value!r} is invalid; expected True/False or a tuple of "
            f"{n_axes} bools (one per axis of the grid)"
        )
    return values


def as_tuple(value: Any) -> Any:
    """Lists become tuples (so that parameters stay hashable); anything else is returned as it is."""
    return tuple(value) if isinstance(value, list) else value


def check_shape(method: str, shape: Any, max_axes: int = 3) -> None:
    """``shape`` is None or a tuple of 1..``max_axes`` positive ints."""
    if shape is None:
        return
    ok = (
        isinstance(shape, tuple)
        and 1 <= len(shape) <= max_axes
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
    )
    if not ok:
        raise ParamError(
            f"method {method!r}: parameter shape={shape!r} is invalid; expected None (1-D over the "
            f"sequence) or a tuple of 1 to {max_axes} positive ints whose product is the sequence length"
        )


def check_fits(method: str, what: str, extents: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """Raise ParamError when an extent (a window's span, in tokens) is larger than its axis."""
    for axis, (extent, length) in enumerate(zip(extents, shape, strict=True)):
        if extent > length:
            raise ParamError(
                f"method {method!r}: {what} spans {extent} positions on axis {axis}, larger than the axis "
                f"(shape={shape}, length {length}); expected at most {length}"
            )


def grid_of(method: str, shape: tuple[int, ...] | None, n_q: int, n_k: int) -> tuple[int, ...]:
    """The grid of a self-attention call: ``shape``, or ``(N,)`` when None. Raise InputError when the call
    is cross-attention or the grid does not hold exactly N tokens."""
    if n_q != n_k:
        raise InputError(
            f"method {method!r} is self-attention on a grid: expected N_q == N_k, got N_q={n_q}, N_k={n_k}"
        )
    if shape is None:
        return (n_q,)
    if math.prod(shape) != n_q:
        raise InputError(
            f"method {method!r}: shape={shape} holds {math.prod(shape)} tokens but the sequence has N={n_q}; "
            f"expected a shape whose product is {n_q}"
        )
    return shape


def raster_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``P_a``: tokens between neighbours along axis ``a`` in raster order."""
    return tuple(math.prod(shape[a + 1 :]) for a in range(len(shape)))
