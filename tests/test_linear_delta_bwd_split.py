"""The delta rule's scalar-gate per-chunk backward with its products over V in two loops
(``op.DELTA_BWD_SPLIT``, ``chunk_delta_bwd_split.py``): every gradient against the one-loop kernel (the same
products in the same order: bit for bit in Triton's interpreter) and against the fp32 token recurrence,
for a gate per token and none (DeltaNet), with and without the fused q/k L2 norm, several value slices
with the last one masked, lengths no multiple of the chunk, float32 and float16 inputs; the switch reaches
the launch only where it applies (per-channel gates and ``DELTA_BWD_BVB`` 0 keep their kernels). Tiny
shapes (Triton's interpreter on a CPU machine)."""

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
#: Split against one loop: bit for bit in the interpreter; a GPU compiler may schedule the float32
#: arithmetic differently (contractions), so within 1e-5 of the largest value there.
SAME = 0.0 if DEV.type == "cpu" else 1e-5


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _inputs(n: int, dk: int, dv: int, gate: str, dtype: torch.dtype, seed: int = 1) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, dk, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 2, n, dv, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, dk, generator=gen) + 1.0)
    beta = torch.rand(1, 2, n, generator=gen)
    h0 = torch.randn(1, 2, dk, dv, generator=gen)
    gg = {"head": g[..., :1].clone(), "channel": g, "none": None}[gate]
    xs = [q.to(dtype), k.to(dtype), v.to(dtype), beta, gg, h0]
    return [t.to(DEV) if t is not None else None for t in xs]


class _Count:
    """Stands in for a Triton kernel in ``op``: counts its launches, then launches."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid: Any) -> Any:
        self.calls += 1
        return self.kernel[grid]


def _run(
    xs: list[Tensor | None], split: bool, l2norm: bool, mp: pytest.MonkeyPatch, channel: bool = False
) -> tuple[list[Tensor], _Count, _Count]:  # fmt: skip
    op = _op()
    mp.setattr(op, "DELTA_BWD_SPLIT_CHANNEL" if channel else "DELTA_BWD_SPLIT", split)
    names = ("delta_bwd_chunk_channel_kernel", "delta_bwd_chunk_channel_split_kernel") if channel else (
        "delta_bwd_chunk_kernel", "delta_bwd_chunk_split_kernel")  # fmt: skip
    one, two = _Count(getattr(op, names[0])), _Count(getattr(op, names[1]))
    mp.setattr(op, names[0], one)
    mp.setattr(op, names[1], two)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], 16, qk_l2norm=l2norm)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad(
        (o.float() * do.float()).sum() + (s * ds).sum(), [t for t in leaves if t is not None]
    )
    mp.setattr(op, names[0], one.kernel)
    mp.setattr(op, names[1], two.kernel)
    return [x.float() for x in got], one, two


def _reference(xs: list[Tensor | None], l2norm: bool) -> list[Tensor]:
    from attnlab.kernels.linear.naive import l2norm as norm

    ref = [t.float().clone().requires_grad_(True) if t is not None else None for t in xs]
    q, k, v, beta, g, h0 = ref
    assert q is not None and k is not None and v is not None and beta is not None
    o, s = delta_recurrence(norm(q) if l2norm else q, norm(k) if l2norm else k, v, beta, g, 0.3, h0)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(xs[0].dtype if xs[0] is not None else o.dtype).float()
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    return list(torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in ref if t is not None]))


@pytest.mark.parametrize(
    ("n", "gate", "l2norm", "dtype"),
    [(63, "head", False, torch.float32), (70, "none", False, torch.float32), (37, "head", True, torch.float32),
     (63, "head", False, torch.float16), (50, "head", True, torch.float16)],
    ids=["n63-head", "n70-deltanet", "n37-head-l2norm", "n63-head-fp16", "n50-head-l2norm-fp16"],
)  # fmt: skip
def test_two_loops_match_one_loop_and_the_recurrence(
    n: int, gate: str, l2norm: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K = 32, V = 40 (slices of 32: the second masked), chunk 16."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_BWD_BVB", 32)
    monkeypatch.setattr(op, "DELTA_BWD_TRANS", True)
    xs = _inputs(n, 32, 40, gate, dtype)
    if l2norm:  # (raw rows of norms far from 1)
        q, k = xs[0], xs[1]
        assert q is not None and k is not None
        xs[0], xs[1] = q * 3.0, k * 0.5
    split, one_a, two_a = _run(xs, True, l2norm, monkeypatch)
    loop, one_b, two_b = _run(xs, False, l2norm, monkeypatch)
    assert (one_a.calls, two_a.calls, one_b.calls, two_b.calls) == (0, 1, 1, 0)
    want = _reference(xs, l2norm)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    names = [nm for nm, t in zip(NAMES, xs, strict=True) if t is not None]
    for nm, a, b, c in zip(names, split, loop, want, strict=True):
        if SAME == 0.0:
            assert torch.equal(a, b), f"{nm}: two loops vs one differ by {float((a - b).abs().max()):.3e}"
        else:
            torch.testing.assert_close(a, b, atol=SAME * float(b.abs().max()), rtol=0)
        scale = float(c.abs().max())
        err = float((a - c).abs().max()) / scale
        assert err < tol, f"{nm}: {err:.2e} of the largest value from the recurrence"


def test_the_switch_applies_to_the_sliced_scalar_kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """BVB = 0 (the whole V tile) and TRANS off keep the one-loop kernel with the switch on."""
    op = _op()
    xs = _inputs(20, 16, 16, "head", torch.float32)
    for bvb, trans in ((0, True), (16, False)):
        monkeypatch.setattr(op, "DELTA_BWD_BVB", bvb)
        monkeypatch.setattr(op, "DELTA_BWD_TRANS", trans)
        _, one, two = _run(xs, True, False, monkeypatch)
        assert (one.calls, two.calls) == (1, 0), (bvb, trans)


@pytest.mark.parametrize(
    ("n", "l2norm", "dtype"),
    [(63, False, torch.float32), (37, True, torch.float32), (50, False, torch.float16)],
    ids=["n63", "n37-l2norm", "n50-fp16"],
)
def test_per_channel_gates_in_two_loops(
    n: int, l2norm: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DELTA_BWD_SPLIT_CHANNEL`` (KDA): every gradient against the one-loop kernel (the partial dk and dG
    rows go through memory between the loops and the chunk-end terms join dG's last row before dX_w X_w
    does: within 1e-6 of the largest value) and the recurrence."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_BWD_BVB", 32)
    xs = _inputs(n, 32, 40, "channel", dtype, seed=2)
    if l2norm:  # (raw rows of norms far from 1)
        q, k = xs[0], xs[1]
        assert q is not None and k is not None
        xs[0], xs[1] = q * 3.0, k * 0.5
    split, one_a, two_a = _run(xs, True, l2norm, monkeypatch, channel=True)
    loop, one_b, two_b = _run(xs, False, l2norm, monkeypatch, channel=True)
    assert (one_a.calls, two_a.calls, one_b.calls, two_b.calls) == (0, 1, 1, 0)
    want = _reference(xs, l2norm)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for nm, a, b, c in zip(NAMES, split, loop, want, strict=True):
        torch.testing.assert_close(
            a, b, atol=1e-6 * float(b.abs().max()), rtol=0, msg=lambda m, nm=nm: f"{nm}: {m}"
        )
        err = float((a - c).abs().max()) / float(c.abs().max())
        assert err < tol, f"{nm}: {err:.2e} of the largest value from the recurrence"
