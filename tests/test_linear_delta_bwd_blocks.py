"""The delta rule's per-chunk backward kernels (``chunk_delta_bwd.py``) looping over the value dim in
slices of ``op.DELTA_BWD_BVB`` columns (0: the whole V tile at once): every gradient (q, k, v, beta, g,
the initial state) against the fp32 token recurrence and against the whole-tile path, for a gate shared
by the channels, none (DeltaNet) and per-channel gates (KDA), and with the fused q/k L2 norm. V spans
several slices and is no multiple of 32 (the last slice masked), lengths are no multiple of the chunk.
Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence
from attnlab.testing import device_under_test

DEV = device_under_test()
NAMES = ("dq", "dk", "dv", "dbeta", "dg", "dh0")


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _inputs(n: int, dk: int, dv: int, gate: str, seed: int = 1) -> list[Tensor | None]:
    """q, k (unit rows), v, beta, g (per channel, one per token (..., 1), or None), h0; fp32, on DEV."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, dk, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 2, n, dv, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, dk, generator=gen) + 1.0)
    beta = torch.rand(1, 2, n, generator=gen)
    h0 = torch.randn(1, 2, dk, dv, generator=gen)
    gg = {"head": g[..., :1].clone(), "channel": g, "none": None}[gate]
    return [t.to(DEV) if t is not None else None for t in (q, k, v, beta, gg, h0)]


class _Spy:
    """Stands in for a Triton kernel in ``op``: records the BVB each launch passes, then launches."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.bvb = kernel, []  # type: list[int]

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.bvb.append(kwargs["BVB"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def _grads(
    xs: list[Tensor | None], chunk: int, l2norm: bool, do: Tensor, ds: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    op = _op()
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], chunk, qk_l2norm=l2norm, fused_l2norm=True)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in leaves if t is not None])
    return o.detach(), s.detach(), list(got)


def _check_slices(
    xs: list[Tensor | None], chunk: int, widths: tuple[int, ...], monkeypatch: pytest.MonkeyPatch,
    l2norm: bool = False,
) -> None:  # fmt: skip
    """Each slice width against the recurrence (autograd through it, and through the L2 norm) and against
    width 0 (the whole V tile)."""
    from attnlab.kernels.linear.naive import l2norm as norm

    op = _op()
    monkeypatch.setattr(op, "DELTA_BWD_SPLIT", False)  # (the one-loop kernel: test_linear_delta_bwd_split)
    monkeypatch.setattr(op, "DELTA_BWD_SPLIT_CHANNEL", False)
    channel = xs[4] is not None and xs[4].shape[-1] > 1
    name = "delta_bwd_chunk_channel_kernel" if channel else "delta_bwd_chunk_kernel"
    spy = _Spy(getattr(op, name))
    monkeypatch.setattr(op, name, spy)
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    rq, rk, rv, rb, rg, rh0 = ref
    assert rq is not None and rk is not None and rv is not None and rb is not None
    ro, rs = delta_recurrence(norm(rq) if l2norm else rq, norm(rk) if l2norm else rk, rv, rb, rg, 0.3, rh0)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(ro.shape, generator=gen).to(DEV), torch.randn(rs.shape, generator=gen).to(DEV)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), [t for t in ref if t is not None])
    names = [nm for nm, t in zip(NAMES, xs, strict=True) if t is not None]
    whole: list[Tensor] = []
    for w in widths:
        monkeypatch.setattr(op, "DELTA_BWD_BVB", w)
        o, s, got = _grads(xs, chunk, l2norm, do, ds)
        assert spy.bvb[-1] == w  # the switch reached the kernel
        _close(f"o (BVB={w})", o, ro.detach(), 2e-5)
        _close(f"state (BVB={w})", s, rs.detach(), 2e-5)
        for nm, a, b in zip(names, got, want, strict=True):
            _close(f"{nm} (BVB={w})", a, b, 1e-4)
        if w == 0:
            whole = got
        else:
            assert whole, "width 0 first"
            for nm, a, b in zip(names, got, whole, strict=True):
                _close(f"{nm} (BVB={w} vs 0)", a, b, 1e-5)


@pytest.mark.parametrize(
    ("n", "chunk", "gate", "dv"),
    [(63, 16, "head", 48), (70, 32, "none", 40), (63, 16, "channel", 40), (70, 32, "channel", 48)],
    ids=["n63-chunk16-head-gate-v48", "n70-chunk32-deltanet-v40", "n63-chunk16-kda-v40", "n70-chunk32-kda-v48"],
)  # fmt: skip
def test_value_slices_match_the_recurrence(
    n: int, chunk: int, gate: str, dv: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K = 32, V = 40 or 48 (64-wide tiles: slices of 16 or 32, the last one partly masked), widths 0, 16
    and 32: every gradient against the recurrence (1e-4) and widths 16, 32 against 0 (1e-5)."""
    _check_slices(_inputs(n, 32, dv, gate), chunk, (0, 16, 32), monkeypatch)


def test_value_slices_with_the_fused_l2_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused q/k L2 norm (its Jacobian applied in ``delta_bwd_chunk_kernel``), scalar gate, slices of
    16: raw q, k of norms far from 1, gradients of the raw q, k against the recurrence on the normalised
    rows."""
    xs = _inputs(37, 32, 40, "head", seed=3)
    q, k = xs[0], xs[1]
    assert q is not None and k is not None
    xs[0], xs[1] = q * 3.0, k * 0.5
    _check_slices(xs, 16, (0, 16), monkeypatch, l2norm=True)
