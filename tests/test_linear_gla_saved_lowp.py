"""gla with the chunk-start states kept for the backward, and the backward's state gradients, in the
inputs' 16-bit dtype (``attnlab.kernels.linear.op.GLA_SAVED_LOWP``): every gradient equals the switch off's
but dg (in Triton's interpreter, float16 inputs: every dot rounded S and dH to float16 before), whose
chunk-end term sum_v S * dH takes the rounded values, and all stay as close to the fp32 recurrence; the kept
states' dtype; the fake (opcheck); the fallback to the unfused kernels with 16-bit states; float32 inputs
and gates shared by the channels unchanged. Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import gated_recurrence
from attnlab.testing import device_under_test

DEV = device_under_test()


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _inputs(n: int, seed: int = 0, dk: int = 16, dv: int = 24) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, n, dk, generator=gen) for _ in range(2))
    v = torch.randn(2, 2, n, dv, generator=gen)
    g = F.logsigmoid(torch.randn(2, 2, n, dk, generator=gen) + 1.0)
    h0 = torch.randn(2, 2, dk, dv, generator=gen)
    return [x.to(DEV) for x in (q.half(), k.half(), v.half(), g, h0)]


def _run(xs: list[Tensor], lowp: bool, mp: pytest.MonkeyPatch) -> list[Tensor]:
    mp.setattr(_op(), "GLA_SAVED_LOWP", lowp)
    leaves = [t.clone().requires_grad_(True) for t in xs]
    o, s = _op().gla_chunk(*leaves[:4], 0.3, leaves[4], 32)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (s * ds).sum(), leaves)
    return [o.detach().float(), s.detach(), *(x.float() for x in grads)]


def _reference(xs: list[Tensor]) -> list[Tensor]:
    ref = [t.float().clone().requires_grad_(True) for t in xs]
    o, s = gated_recurrence(*ref[:4], 0.3, ref[4])
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(DEV).half().float()
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), ref)
    return [o.detach(), s.detach(), *grads]


def test_sixteen_bit_kept_states_match_float32_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """n = 70, chunk 32: three chunks, the last padded."""
    xs = _inputs(70, seed=3)
    on, off, want = _run(xs, True, monkeypatch), _run(xs, False, monkeypatch), _reference(xs)
    for name, a, b, c in zip(("o", "state", "dq", "dk", "dv", "dg", "dh0"), on, off, want, strict=True):
        if DEV.type == "cpu" and name != "dg":
            assert torch.equal(a, b), f"{name}: {float((a - b).abs().max()):.3e}"
        scale = float(c.abs().max())
        assert float((a - b).abs().max()) / scale < 1e-2, name
        err_on, err_off = (float((x - c).abs().max()) / scale for x in (a, b))
        assert err_on <= 2 * err_off + 2e-3, (
            f"{name}: {err_on:.2e} from the recurrence, switch off {err_off:.2e}"
        )


def test_what_the_forward_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit kept states with the switch, per-channel gates and 16-bit inputs only; float32 otherwise."""
    op = _op()
    q, k, v, g, h0 = _inputs(40, seed=4)
    for lowp in (True, False):
        monkeypatch.setattr(op, "GLA_SAVED_LOWP", lowp)
        for dtype in (torch.float16, torch.float32):
            hs = op.gla_chunk_fwd(q.to(dtype), k.to(dtype), v.to(dtype), g, h0, 0.3, 16, True, None, True)[2]
            assert hs.dtype == (dtype if lowp else torch.float32), (lowp, dtype)
            assert hs.shape == (2, 2, 3, 16, 24)
    from attnlab.kernels.linear.launch_gla import gla_saved_dtype

    monkeypatch.setattr(op, "GLA_SAVED_LOWP", True)
    assert gla_saved_dtype(q, g[..., 0]) == torch.float32  # (one gate per token: the unfused kernels)
    for flag in ("GLA_H_PASS", "GLA_BWD_FUSED", "GLA_BWD_H_PASS"):
        monkeypatch.setattr(op, flag, False)
        assert gla_saved_dtype(q, g) == torch.float32, flag
        monkeypatch.setattr(op, flag, True)


def test_opcheck_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op()
    monkeypatch.setattr(op, "GLA_SAVED_LOWP", True)
    q, k, v, g, h0 = (t.clone().requires_grad_(True) for t in _inputs(21, seed=5))
    torch.library.opcheck(op.gla_chunk_fwd, (q, k, v, g, h0, 0.3, 16, True, None, True))


def test_the_unfused_fallback_takes_sixteen_bit_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the fused kernel does not fit the GPU (OutOfResources), the previous kernels run on the kept
    16-bit states converted: the switch off's gradients but dg's rounding."""
    from triton.runtime.errors import OutOfResources

    tried: list[object] = []

    class TooBig:
        def __getitem__(self, grid: object) -> None:
            tried.append(grid)
            raise OutOfResources(130000, 101376, "shared memory")

    xs = _inputs(40, seed=6)
    off = _run(xs, False, monkeypatch)
    monkeypatch.setattr(_op(), "gla_bwd_chunk_kernel", TooBig())
    on = _run(xs, True, monkeypatch)
    assert tried  # (the fused kernel was tried first, then the fallback ran)
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dg", "dh0"), on, off, strict=True):
        assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max()), name
