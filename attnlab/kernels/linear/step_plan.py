"""The decode step's launch plan: a :class:`StepPlan` holds what one launch of the recurrent step kernel
(``fwd.py``) needs for one signature of its inputs (:func:`_step_key`), resolved once
(:func:`_make_step_plan`; ``op.step_plan`` keeps the plans)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attnlab.kernels.linear.launch import _blocks, _scalar_gate, cdiv


@dataclass(frozen=True, slots=True)
class StepPlan:
    """The step kernel's launch for one signature of its inputs (``op.step_plan``), resolved once: the
    grid, the runtime sizes (N, K, V) and the constexprs, the shapes of o and the final state, and which
    of g, beta and h0 the kernel may read as they are (``*_ready``: their memory already holds what
    ``expand(...).contiguous()`` / ``float().contiguous()`` would give: a call makes no view of them)."""

    grid: tuple[int, int]
    sizes: tuple[int, int, int]
    out_shape: tuple[int, int, int, int]
    state_shape: tuple[int, int, int, int]
    consts: dict[str, int | bool]
    g_ready: bool
    beta_ready: bool
    h0_ready: bool


def _step_gate(g: Tensor, b: int, h: int, n: int, dk: int) -> tuple[bool, Tensor]:
    """(whether g holds one value per token, g as the step kernel reads it, contiguous: (B, H, N) then,
    else (B, H, N, K)). A 3-D g is one per token; a 4-D one as ``_scalar_gate`` says."""
    if g.dim() == 3:
        return True, g.expand(b, h, n).contiguous()
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    assert gx is not None
    return scalar, gx.contiguous()


def _reads_as_is(given: Tensor | None, made: Tensor | None) -> bool:
    """Whether the kernel reading ``given`` reads what it would read in ``made`` (``made``, contiguous, was
    made from it without a copy: the same first element and dtype). Never for an empty tensor (its data
    pointer tells nothing)."""
    if given is None or made is None or given.numel() == 0:
        return False
    return made.data_ptr() == given.data_ptr() and made.dtype == given.dtype


def _step_key(
    q: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, qk_l2norm: bool,
    check: bool,
) -> tuple[object, ...]:  # fmt: skip
    """What a :class:`StepPlan` depends on (k has q's shape): shapes, the strides of g, beta and h0 (the
    copies they need), h0's dtype, q's dtype and device, the flags."""
    return (
        q.shape, q.dtype, q.device, v.shape,
        None if g is None else g.shape, None if g is None else g.stride(),
        None if beta is None else beta.shape, None if beta is None else beta.stride(),
        None if h0 is None else h0.shape, None if h0 is None else h0.stride(),
        None if h0 is None else h0.dtype, qk_l2norm, check,
    )  # fmt: skip


def _make_step_plan(
    q: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, qk_l2norm: bool,
    check: bool,
) -> StepPlan:  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    bk, _, bv, _ = _blocks(dk, dv)
    g_scalar, gc = (False, None) if g is None else _step_gate(g, b, h, n, dk)
    return StepPlan(
        grid=(cdiv(dv, bv), b * h),
        sizes=(n, dk, dv),
        out_shape=(b, h, n, dv),
        state_shape=(b, h, dk, dv),
        consts={
            "HAS_G": g is not None,
            "HAS_H0": h0 is not None,
            "DELTA": beta is not None,
            "BK": bk,
            "BV": bv,
            "G_SCALAR": g_scalar,
            "L2NORM": qk_l2norm,
            "CHECK": check,
            "num_warps": 4,
        },
        g_ready=_reads_as_is(g, gc),
        beta_ready=beta is not None and _reads_as_is(beta, beta.expand(b, h, n).contiguous()),
        h0_ready=h0 is not None and _reads_as_is(h0, h0.float().contiguous()),
    )


def step_programs(q: Tensor, v: Tensor) -> int:
    """The step kernel's programs (value blocks x batch x heads): the length of ``linear_step``'s ``bad``."""
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    return cdiv(dv, _blocks(dk, dv)[2]) * b * h
