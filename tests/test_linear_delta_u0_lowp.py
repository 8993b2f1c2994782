"""The gated delta rule with the UT transform's U0 = T (beta v) in the inputs' 16-bit dtype
(``attnlab.kernels.linear.op.DELTA_U0_LOWP``): the forward pass reads it into float32 and rounds
U = U0 - W S to that dtype anyway, so the switch adds one rounding of U0. Checked against the switch off
and the fp32 recurrence (output, final state, every gradient) under each gate kind, with the fused L2
norm, without a backward, with float32 kept tensors and over packed sequences; U0's dtype and which
flags it follows; the custom op's opcheck. Tiny shapes (Triton's interpreter on a CPU machine; there the
16-bit branches are forced, as on the GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence
from attnlab.testing import device_under_test

DEV = device_under_test()


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


@pytest.fixture
def gpu_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers take their 16-bit branches (the GPU's) in Triton's interpreter too."""
    from attnlab.kernels.linear import launch_delta

    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)


def _inputs(n: int, gate: str, seed: int) -> list[Tensor | None]:
    """q, k (L2-normalised), v in float16; beta, g (per channel, per token or None), h0 float32."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(2, 2, n, 24, generator=gen)
    beta = torch.rand(2, 2, n, generator=gen)
    g: Tensor | None = F.logsigmoid(torch.randn(2, 2, n, 16, generator=gen) + 1.0)
    assert g is not None
    if gate == "head":
        g = g[..., :1].clone()
    elif gate == "none":
        g = None
    h0 = torch.randn(2, 2, 16, 24, generator=gen)
    return [None if t is None else t.to(DEV) for t in (q.half(), k.half(), v.half(), beta, g, h0)]


def _run(xs: list[Tensor | None], u0_lowp: bool, mp: pytest.MonkeyPatch, l2: bool = False,
         cu: list[int] | None = None, grad: bool = True) -> list[Tensor]:  # fmt: skip
    """(o, final state, every gradient with ``grad``) of the chunk op, chunk 32."""
    op = _op()
    mp.setattr(op, "DELTA_U0_LOWP", u0_lowp)
    leaves = [None if t is None else t.clone().requires_grad_(grad) for t in xs]
    q, k, v, beta, g, h0 = leaves
    assert q is not None and k is not None and v is not None and beta is not None
    if cu is None:
        o, s = op.delta_chunk(q, k, v, beta, g, 0.3, h0, 32, l2)
    else:
        o, s = op.delta_chunk_varlen(q, k, v, beta, g, 0.3, h0, 32, torch.tensor(cu).to(DEV), l2)
    if not grad:
        return [o.float(), s]
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad(
        (o.float() * do.float()).sum() + (s * ds).sum(), [t for t in leaves if t is not None]
    )
    return [o.detach().float(), s.detach(), *(x.float() for x in grads)]


def _reference(xs: list[Tensor | None], l2: bool = False) -> list[Tensor]:
    from attnlab.kernels.linear.naive import l2norm

    ref = [None if t is None else t.float().clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = ref
    assert q is not None and k is not None and v is not None and beta is not None
    if l2:
        q, k = l2norm(q), l2norm(k)
    o, s = delta_recurrence(q, k, v, beta, g, 0.3, h0)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).half().float()
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in ref if t is not None])
    return [o.detach(), s.detach(), *grads]


def _compare(on: list[Tensor], off: list[Tensor], want: list[Tensor]) -> None:
    """Within float16 rounding of the switch off (1e-2 of the largest value), and no further from the
    recurrence than twice the switch off's error plus 2e-3 of the largest value; the output changes (the
    switch reached the kernels)."""
    assert len(on) == len(off) == len(want)
    for i, (a, b, c) in enumerate(zip(on, off, want, strict=True)):
        assert torch.isfinite(a).all(), i
        scale = float(c.abs().max()) + 1e-6
        assert float((a - b).abs().max()) / scale < 1e-2, i
        err_on, err_off = (float((x - c).abs().max()) / scale for x in (a, b))
        assert err_on <= 2 * err_off + 2e-3, (
            f"result {i}: {err_on:.2e} from the recurrence, off {err_off:.2e}"
        )
    assert not torch.equal(on[0], off[0])


@pytest.mark.parametrize(
    ("gate", "l2"), [("head", False), ("channel", False), ("none", False), ("head", True)]
)
@pytest.mark.usefixtures("gpu_branches")
def test_sixteen_bit_u0_matches_float32(gate: str, l2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """n = 70 with chunk 32: three chunks, the last padded."""
    xs = _inputs(70, gate, seed=11)
    _compare(_run(xs, True, monkeypatch, l2), _run(xs, False, monkeypatch, l2), _reference(xs, l2))


@pytest.mark.parametrize("saved_lowp", [True, False])
@pytest.mark.usefixtures("gpu_branches")
def test_without_backward_and_with_float32_kept_tensors(
    saved_lowp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No backward (U written in the inputs' dtype over U0) and a backward with float32 kept tensors
    (U then in a fresh float32 buffer)."""
    monkeypatch.setattr(_op(), "DELTA_SAVED_LOWP", saved_lowp)
    xs = _inputs(45, "head", seed=12)
    want = _reference(xs)
    _compare(_run(xs, True, monkeypatch, grad=False), _run(xs, False, monkeypatch, grad=False), want[:2])
    _compare(_run(xs, True, monkeypatch), _run(xs, False, monkeypatch), want)


@pytest.mark.usefixtures("gpu_branches")
def test_packed_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequences of 30 and 45 tokens packed: within float16 rounding of the switch off."""
    xs = _inputs(75, "channel", seed=13)
    packed = [x[:1] if x is not None else None for x in xs[:5]] + [xs[5]]
    on = _run(packed, True, monkeypatch, cu=[0, 30, 75])
    off = _run(packed, False, monkeypatch, cu=[0, 30, 75])
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        assert torch.isfinite(a).all(), i
        assert float((a - b).abs().max()) / (float(b.abs().max()) + 1e-6) < 1e-2, i
    assert not torch.equal(on[0], off[0])  # (the switch reached the kernels)


def test_u0_dtype_follows_the_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit U0 only with the switch and the 16-bit forward pass (the GPU's branches: float32 in Triton's
    interpreter, whose pass takes float32 operands); float32 inputs keep float32."""
    from attnlab.kernels.linear import launch_delta
    from attnlab.kernels.linear.launch_delta import u0_dtype

    op = _op()
    x = torch.zeros(1, dtype=torch.float16)
    monkeypatch.setattr(op, "DELTA_U0_LOWP", True)
    want = torch.float32 if launch_delta.IMPORTED_INTERPRETED else torch.float16
    assert u0_dtype(x) == want
    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)
    assert u0_dtype(x) == torch.float16
    assert u0_dtype(x.bfloat16()) == torch.bfloat16
    assert u0_dtype(x.float()) == torch.float32
    monkeypatch.setattr(op, "DELTA_U0_LOWP", False)
    assert u0_dtype(x) == torch.float32
    monkeypatch.setattr(op, "DELTA_U0_LOWP", True)
    for flag in ("DELTA_H_V2", "DELTA_H_LOWP"):
        monkeypatch.setattr(op, flag, False)
        assert u0_dtype(x) == torch.float32, flag
        monkeypatch.setattr(op, flag, True)


def test_the_forward_op_passes_opcheck_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept U's dtype is the kept tensors' (``saved_dtype``), whatever U0's."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_U0_LOWP", True)
    xs = _inputs(21, "head", seed=14)
    q, k, v, beta, g, h0 = (None if t is None else t.clone().requires_grad_(True) for t in xs)
    torch.library.opcheck(op.delta_chunk_fwd, (q, k, v, beta, g, h0, 0.3, 16, True, None, False))
