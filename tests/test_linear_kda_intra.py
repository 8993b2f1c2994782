"""The delta rule's intra-chunk scores under per-channel gates (KDA) by the split-dot kernel
(``attnlab.kernels.linear.op.DELTA_INTRA_V2``, issue 9): ``intra_scores_v2_kernel`` with STRICT and beta
against the float64 scores and the sub-block kernel, and the KDA chunk kernels with the switch on and off
against the token recurrence (output, state, every gradient). Tiny shapes (Triton's interpreter on a CPU
machine)."""

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


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("f32", [True, False])
@pytest.mark.parametrize(("strict", "beta"), [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk", [16, 64])
def test_split_scores_with_strict_and_beta_are_exact(chunk: int, strict: bool, beta: bool, f32: bool) -> None:
    """(beta_t) sum_d x_td k_jd exp(G_td - G_jd) for j < t (strict) or j <= t, against float64 and the
    sub-block kernel: a partial last chunk, decays e^-30 per token on half the channels; the upper
    triangle (and the diagonal when strict) exactly 0."""
    op = _op()
    n, dk = 70, 24
    gen = torch.Generator().manual_seed(0)
    x, k = (torch.randn(1, 2, n, dk, generator=gen).to(DEV) for _ in range(2))
    g = F.logsigmoid(torch.randn(1, 2, n, dk, generator=gen) + 1.0)
    g = torch.where(torch.arange(dk) % 2 == 0, -30.0, g).to(DEV)
    b = torch.rand(1, 2, n, generator=gen).to(DEV) if beta else None
    gc = op.chunk_cumsum(g, 1, 2, n, dk, chunk, x.device)
    got = op.intra_scores(x, k, gc, b, chunk, strict=strict, v2=True, f32_operands=f32)
    old = op.intra_scores(x, k, gc, b, chunk, strict=strict)
    nc = gc.shape[2] // chunk
    xp, kp = (F.pad(t.double(), (0, 0, 0, nc * chunk - n)).view(1, 2, nc, chunk, dk) for t in (x, k))
    gcc = gc.double().view(1, 2, nc, chunk, dk)
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    diff = torch.where(keep[..., None], gcc[..., :, None, :] - gcc[..., None, :, :], float("-inf"))
    want = (xp[..., :, None, :] * kp[..., None, :, :] * diff.exp()).sum(-1)
    if b is not None:
        want = want * F.pad(b.double(), (0, nc * chunk - n)).view(1, 2, nc, chunk)[..., None]
    want = want.view(1, 2, nc * chunk, chunk)
    assert torch.isfinite(got).all()
    dropped = ~keep.repeat(nc, 1)
    assert torch.equal(got[..., dropped], torch.zeros_like(got[..., dropped]))
    _close("scores", got.double(), want, 1e-5)
    _close("scores (v2 vs sub-block kernel)", got, old, 1e-5)


@pytest.mark.parametrize("v2", [True, False])
@pytest.mark.parametrize(("n", "chunk"), [(63, 16), (70, 64)])
def test_kda_kernels_match_the_recurrence(
    n: int, chunk: int, v2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delta rule under per-channel gates with the switch on (the default) and off: output, final state
    and the gradients of q, k, v, beta, g and the initial state."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_INTRA_V2", v2)
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, n, 8, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 1, n, 8, generator=gen)
    g = F.logsigmoid(torch.randn(1, 1, n, 8, generator=gen) + 1.0)
    beta = torch.rand(1, 1, n, generator=gen)
    h0 = torch.randn(1, 1, 8, 8, generator=gen)
    xs = [t.to(DEV) for t in (q, k, v, beta, g, h0)]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    ref = [t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], chunk)
    ro, rs = delta_recurrence(ref[0], ref[1], ref[2], ref[3], ref[4], 0.3, ref[5])
    _close("o", o, ro, 2e-5)
    _close("state", s, rs, 2e-5)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), got, want, strict=True):
        _close(name, a, b, 1e-4)
