"""The gated delta rule with what the forward keeps for the backward in the inputs' 16-bit dtype
(``attnlab.kernels.linear.op.DELTA_SAVED_LOWP``): the chunk-start states S, W, U and T, and the
backward's state gradients dH. Every kernel reading them rounds them to that dtype as dot operands on
the GPU, so the switch changes what is stored, not the results beyond rounding: checked here against
the switch off and the fp32 recurrence (output, final state, every gradient) under each gate kind, with
the fused L2 norm and packed sequences; the kept tensors' dtypes and bytes; the custom ops' opcheck
(the fake follows the switch); float32 inputs unchanged. Tiny shapes (Triton's interpreter on a CPU
machine; there the 16-bit dot branches are forced, as on the GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence
from attnlab.testing import device_under_test

DEV = device_under_test()
NAMES = ("o", "state", "dq", "dk", "dv", "dbeta", "dg", "dh0")


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _inputs(n: int, gate: str, seed: int = 0, dk: int = 16, dv: int = 24) -> list[Tensor | None]:
    """q, k (L2-normalised), v in float16; beta, g (per channel, per token or None), h0 float32."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, n, dk, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(2, 2, n, dv, generator=gen)
    beta = torch.rand(2, 2, n, generator=gen)
    g: Tensor | None = F.logsigmoid(torch.randn(2, 2, n, dk, generator=gen) + 1.0)
    assert g is not None
    if gate == "head":
        g = g[..., :1].clone()
    elif gate == "none":
        g = None
    h0 = torch.randn(2, 2, dk, dv, generator=gen)
    xs = [q.half(), k.half(), v.half(), beta, g, h0]
    return [None if t is None else t.to(DEV) for t in xs]


def _run(
    xs: list[Tensor | None], saved_lowp: bool, mp: pytest.MonkeyPatch, l2: bool = False,
    cu: list[int] | None = None, du_lowp: bool = False,
) -> list[Tensor]:  # fmt: skip
    """(o, final state, every gradient) of the chunk op, chunk 32; dU in float32 unless ``du_lowp``
    (``DELTA_BWD_DU_LOWP``, tested on its own below)."""
    op = _op()
    mp.setattr(op, "DELTA_SAVED_LOWP", saved_lowp)
    mp.setattr(op, "DELTA_BWD_DU_LOWP", du_lowp)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = leaves
    assert q is not None and k is not None and v is not None and beta is not None
    if cu is None:
        o, s = op.delta_chunk(q, k, v, beta, g, 0.3, h0, 32, l2)
    else:
        o, s = op.delta_chunk_varlen(q, k, v, beta, g, 0.3, h0, 32, torch.tensor(cu).to(DEV), l2)
    return [o.detach().float(), s.detach(), *(x.float() for x in _grads(o, s, leaves))]


def _grads(o: Tensor, s: Tensor, leaves: list[Tensor | None]) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    return torch.autograd.grad(
        (o.float() * do.float()).sum() + (s * ds).sum(), [t for t in leaves if t is not None]
    )


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


def _names(xs: list[Tensor | None]) -> list[str]:
    return ["o", "state"] + [nm for nm, t in zip(NAMES[2:], xs, strict=True) if t is not None]


def _compare(on: list[Tensor], off: list[Tensor], want: list[Tensor], names: list[str]) -> None:
    """The switch on equals the switch off bit for bit but for dg (in Triton's interpreter, float16
    inputs: every dot rounded its operands to float16 before; on a GPU within 1e-2 of the largest value),
    whose chunk-end term sum_v S * dH now takes the rounded S and dH: there within float16 rounding. And
    no further from the recurrence than twice the switch off's error plus 2e-3 of the largest value."""
    assert len(on) == len(off) == len(want) == len(names)
    for name, a, b, c in zip(names, on, off, want, strict=True):
        assert torch.isfinite(a).all(), name
        if DEV.type == "cpu" and name != "dg":
            assert torch.equal(a, b), f"{name}: {float((a - b).abs().max()):.3e}"
        scale = float(c.detach().abs().max()) + 1e-6
        diff = float((a - b).abs().max()) / scale
        assert diff < 1e-2, f"{name}: switch on vs off differ by {diff:.2e} of the largest value"
        err_on = float((a - c).abs().max()) / scale
        err_off = float((b - c).abs().max()) / scale
        assert err_on <= 2 * err_off + 2e-3, (
            f"{name}: {err_on:.2e} from the recurrence, switch off {err_off:.2e}"
        )


@pytest.fixture
def gpu_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers take their 16-bit dot branches (the GPU's) in Triton's interpreter too."""
    from attnlab.kernels.linear import launch_delta

    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)


@pytest.mark.parametrize(
    ("gate", "l2"), [("head", False), ("channel", False), ("none", False), ("head", True)]
)
@pytest.mark.usefixtures("gpu_branches")
def test_sixteen_bit_kept_tensors_match_float32_ones(
    gate: str, l2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n = 70 with chunk 32: three chunks, the last padded."""
    xs = _inputs(70, gate, seed=3)
    on = _run(xs, True, monkeypatch, l2)
    off = _run(xs, False, monkeypatch, l2)
    _compare(on, off, _reference(xs, l2), _names(xs))


@pytest.mark.usefixtures("gpu_branches")
def test_packed_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Varlen (two sequences of 30 and 45 tokens, one per batch row's worth of states): as one pass each."""
    xs = _inputs(75, "head", seed=5)
    one = [x[:1] if x is not None else None for x in xs[:5]]
    h0 = xs[5]
    assert h0 is not None
    packed = [*one, h0]
    on = _run(packed, True, monkeypatch, cu=[0, 30, 75])
    off = _run(packed, False, monkeypatch, cu=[0, 30, 75])
    names = _names(packed)
    for name, a, b in zip(names, on, off, strict=True):
        diff = float((a - b).abs().max()) / (float(b.abs().max()) + 1e-6)
        assert diff < 1e-2, f"{name}: switch on vs off differ by {diff:.2e}"


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_what_the_forward_keeps(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the switch: S, W, U and T in the inputs' dtype (half the bytes); without: float32. Float32
    inputs keep float32 either way."""
    op = _op()
    xs = _inputs(70, gate, seed=4)
    for saved_lowp in (True, False):
        monkeypatch.setattr(op, "DELTA_SAVED_LOWP", saved_lowp)
        for dtype in (torch.float16, torch.float32):
            q, k, v = (x.to(dtype) for x in xs[:3] if x is not None)
            res = op.delta_chunk_fwd(q, k, v, xs[3], xs[4], xs[5], 0.3, 32, True)
            hs, w, u, t = res[2:6]
            want = dtype if saved_lowp else torch.float32
            assert [x.dtype for x in (hs, w, u, t)] == [want] * 4, (saved_lowp, dtype)
            assert hs.shape == (2, 2, 3, 16, 24) and w.shape == (2, 2, 96, 16)
            assert u.shape == (2, 2, 96, 24) and t.shape == (2, 2, 96, 32)


def test_the_switch_follows_the_sequential_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit kept tensors only with both 16-bit sequential passes (their old forms read float32 W); bf16
    in Triton's interpreter keeps float32 (its dots take float32 operands there)."""
    from attnlab.kernels.linear import launch
    from attnlab.kernels.linear.launch_delta import saved_dtype

    op = _op()
    x = torch.zeros(1, dtype=torch.float16)
    monkeypatch.setattr(op, "DELTA_SAVED_LOWP", True)
    assert saved_dtype(x) == torch.float16
    assert saved_dtype(x.float()) == torch.float32
    bf16 = torch.float32 if launch.IMPORTED_INTERPRETED else torch.bfloat16
    assert saved_dtype(x.bfloat16()) == bf16
    for flag in ("DELTA_H_V2", "DELTA_H_LOWP", "DELTA_BWD_DH_V2", "DELTA_BWD_DH_LOWP"):
        monkeypatch.setattr(op, flag, False)
        assert saved_dtype(x) == torch.float32, flag
        monkeypatch.setattr(op, flag, True)


def test_the_delta_ops_pass_opcheck_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake's kept tensors follow the switch (dtype and shape); the backward takes 16-bit S, W, U, T."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_SAVED_LOWP", True)
    xs = _inputs(21, "channel", seed=6)
    q, k, v, beta, g, h0 = (None if t is None else t.clone().requires_grad_(True) for t in xs)
    assert g is not None
    g1 = g[..., :1].detach().clone().requires_grad_(True)
    for gate in (g, g1):
        torch.library.opcheck(op.delta_chunk_fwd, (q, k, v, beta, gate, h0, 0.3, 16, True, None, False))
    xd = [None if t is None else t.detach() for t in (q, k, v, beta, g1, h0)]
    res = op.delta_chunk_fwd(*xd[:5], xd[5], 0.3, 16, True)
    o, ht, hs, w, u, t = res[:6]
    assert hs.dtype == w.dtype == u.dtype == t.dtype == torch.float16
    torch.library.opcheck(op.delta_chunk_bwd, (*xd[:5], hs, w, u, t, torch.randn_like(o), torch.randn_like(ht),
                                               0.3, 16, None, None, None))  # fmt: skip


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.usefixtures("gpu_branches")
def test_sixteen_bit_du(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DELTA_BWD_DU_LOWP`` on top of the 16-bit kept tensors: dU in float16 (its intra-chunk part rounded
    once more before the pass adds the state term): every result within float16 rounding of the float32
    dU's and as close to the recurrence (the rule of :func:`_compare`, without its bit-equality)."""
    xs = _inputs(70, gate, seed=8)
    on = _run(xs, True, monkeypatch, du_lowp=True)
    off = _run(xs, True, monkeypatch)
    want = _reference(xs)
    changed = False
    for name, a, b, c in zip(_names(xs), on, off, want, strict=True):
        scale = float(c.abs().max()) + 1e-6
        assert float((a - b).abs().max()) / scale < 1e-2, name
        err_on, err_off = (float((x - c).abs().max()) / scale for x in (a, b))
        assert err_on <= 2 * err_off + 2e-3, f"{name}: {err_on:.2e} from the recurrence, off {err_off:.2e}"
        changed |= not torch.equal(a, b)
    assert changed  # (the switch reached the pass: dU's rounding shows somewhere)
