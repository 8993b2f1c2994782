"""The delta rule's forward pass under per-channel gates (KDA) reading precomputed decayed keys
(``attnlab.kernels.linear.op.DELTA_H_KG``): the gate cumsum's launch also writes KG = k exp(G_C - G)
(``gate_cumsum_kg``), and ``delta_h_v2_kernel`` (GATE 3) reads it instead of k and the gates with an exp
per element. KG is checked against its definition in PyTorch; the chunk op with the switch against
without it: output, final state and every gradient equal (the same products, rounded the same way), in
float16 with the GPU's 16-bit branches and in float32, with the fused L2 norm, without a backward and over
packed sequences. Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.testing import device_under_test

DEV = device_under_test()
#: Equal bit for bit in Triton's interpreter; on a GPU within 1e-6 of the largest value (the compiler may
#: contract the decay's product differently in the two kernels).
TOL = 0.0 if DEV.type == "cpu" else 1e-6


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


@pytest.fixture
def gpu_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers take their 16-bit branches (the GPU's) in Triton's interpreter too."""
    from attnlab.kernels.linear import launch_delta

    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)


def _close(name: str, got: Tensor, want: Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert torch.isfinite(got).all(), name
    if TOL == 0.0:
        assert torch.equal(got, want), f"{name}: {float((got.float() - want.float()).abs().max()):.3e}"
    else:
        scale = float(want.float().abs().max()) + 1e-12
        assert float((got.float() - want.float()).abs().max()) / scale <= TOL, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "chunk"), [(70, 32), (64, 64), (5, 16)])
def test_kg_is_the_decayed_keys(dtype: torch.dtype, n: int, chunk: int) -> None:
    """GC equals ``gate_cumsum``'s; KG = k exp(G_C - G) per chunk (float32 product rounded to the dtype
    asked), zero in the padded rows."""
    op = _op()
    gen = torch.Generator().manual_seed(n)
    k = torch.randn(2, 3, n, 16, generator=gen).to(DEV, dtype)
    g = F.logsigmoid(torch.randn(2, 3, n, 16, generator=gen) + 1.0).to(DEV)
    gc, kg = op.gate_cumsum_kg(g, k, chunk, dtype)
    _close("GC", gc, op.gate_cumsum(g, chunk))
    np_ = gc.shape[2]
    last = gc.view(2, 3, np_ // chunk, chunk, 16)[:, :, :, -1:, :]
    want = F.pad(k.float(), (0, 0, 0, np_ - n)).view(2, 3, np_ // chunk, chunk, 16) * torch.exp(
        last - gc.view(2, 3, np_ // chunk, chunk, 16)
    )
    want = want.view(2, 3, np_, 16).to(dtype)
    assert kg.dtype == dtype and kg.shape == (2, 3, np_, 16)
    assert torch.allclose(kg.float(), want.float(), rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-7)
    assert torch.count_nonzero(kg[:, :, n:]) == 0


def _inputs(n: int, seed: int, dtype: torch.dtype, n_seq: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, n, 24, generator=gen)
    beta = torch.rand(1, 2, n, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, 16, generator=gen) + 1.0)
    h0 = torch.randn(n_seq, 2, 16, 24, generator=gen)
    xs = (q.to(dtype), F.normalize(k, dim=-1).to(dtype), v.to(dtype), beta, g, h0)
    return [t.to(DEV) for t in xs]


def _run(
    xs: list[Tensor], on: bool, mp: pytest.MonkeyPatch, l2: bool, cu: list[int] | None, grad: bool
) -> list[Tensor]:
    op = _op()
    mp.setattr(op, "DELTA_H_KG", on)
    leaves = [t.clone().requires_grad_(grad) for t in xs]
    q, k, v, beta, g, h0 = leaves
    if cu is None:
        o, s = op.delta_chunk(q, k, v, beta, g, 0.3, h0, 32, l2)
    else:
        o, s = op.delta_chunk_varlen(q, k, v, beta, g, 0.3, h0, 32, torch.tensor(cu).to(DEV), l2)
    if not grad:
        return [o, s]
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (s * ds).sum(), leaves)
    return [o.detach(), s.detach(), *grads]


@pytest.mark.usefixtures("gpu_branches")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("l2", "cu", "grad"),
    [(False, None, True), (True, None, True), (False, None, False), (False, [0, 20, 70], True)],
)
def test_the_chunk_op_gives_the_same_results(
    dtype: torch.dtype, l2: bool, cu: list[int] | None, grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n = 70, chunk 32 (the last chunk padded): output, final state (and every gradient) as without KG."""
    op = _op()
    calls: list[torch.dtype] = []
    real = op.gate_cumsum_kg

    def counted(g: Tensor, k: Tensor, chunk: int, kg_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        calls.append(kg_dtype)
        return real(g, k, chunk, kg_dtype)  # type: ignore[no-any-return]

    monkeypatch.setattr(op, "gate_cumsum_kg", counted)
    xs = _inputs(70, seed=4, dtype=dtype, n_seq=1 if cu is None else len(cu) - 1)
    on = _run(xs, True, monkeypatch, l2, cu, grad)
    assert calls == [dtype]  # (the forward's launch, KG in the keys' dtype for the 16-bit pass)
    off = _run(xs, False, monkeypatch, l2, cu, grad)
    assert len(calls) == 1
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dbeta", "dg", "dh0"), on, off, strict=False):
        _close(name, a, b)


def test_gates_shared_by_the_channels_ignore_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A (B, H, N, 1) gate keeps its launches: no KG is made."""
    op = _op()

    def refused(*a: object) -> None:
        raise AssertionError("gate_cumsum_kg called for a gate shared by the channels")

    monkeypatch.setattr(op, "gate_cumsum_kg", refused)
    xs = _inputs(40, seed=5, dtype=torch.float32)
    xs[4] = xs[4][..., :1].contiguous()
    on = _run(xs, True, monkeypatch, False, None, True)
    off = _run(xs, False, monkeypatch, False, None, True)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
