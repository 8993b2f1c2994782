"""The backward of the per-channel decayed intra-chunk scores by whole chunks (``score_bwd_v2_kernel``,
launched by ``launch_scores.score_bwd_v2``): the sums that the delta rule's per-channel-gate backward adds
into its float32 gradient buffers, against the 16-row sub-block kernel (``score_bwd_kernel``, launched as
``delta_bwd_channel_launch`` launches it) and a float64 reference of the formula. Tiny shapes (Triton's
interpreter on a CPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.testing import device_under_test, on_cuda

DEV = device_under_test()


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    """Close to ``tol`` relative, or to ``tol`` times want's largest magnitude."""
    try:
        torch.testing.assert_close(got, want, atol=tol * max(want.abs().max().item(), 1.0), rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _inputs(
    bh: tuple[int, int], n: int, dk: int, chunk: int, dtype: torch.dtype, same_out: bool, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(x, y (y is x when ``same_out``), gc (B, H, NP, K) float32 as the delta backward makes it, dP (B, H,
    NP, chunk) float32 zero above the diagonal (and on it when ``same_out``), [dx, dy, dgc]: random
    float32 buffers to add into (dx is dy when ``same_out``))."""
    from attnlab.kernels.linear.launch_scores import gate_cumsum

    b, h = bh
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, dk, generator=gen).to(dtype)
    y = x if same_out else torch.randn(b, h, n, dk, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(b, h, n, dk, generator=gen) + 1.0)
    g = torch.where(torch.arange(dk) % 3 == 0, -20.0 * torch.rand(b, h, n, dk, generator=gen), g)
    gc = gate_cumsum(g.to(DEV), chunk)  # (the delta backward's _delta_cumsum with DELTA_FUSED_GLUE)
    np_ = gc.shape[2]
    keep = torch.ones(chunk, chunk, dtype=torch.bool).tril(-1 if same_out else 0).repeat(np_ // chunk, 1)
    dp = torch.randn(b, h, np_, chunk, generator=gen) * keep
    dx = torch.randn(b, h, np_, dk, generator=gen)
    dy = dx if same_out else torch.randn(b, h, np_, dk, generator=gen)
    dgc = torch.randn(b, h, np_, dk, generator=gen)
    xd = x.to(DEV)
    return xd, xd if same_out else y.to(DEV), gc, dp.to(DEV), [dx, dy, dgc]


def _bufs(bufs: list[Tensor], same_out: bool) -> list[Tensor]:
    """Fresh copies on the device (dx and dy one tensor when ``same_out``)."""
    dx = bufs[0].clone().to(DEV)
    return [dx, dx if same_out else bufs[1].clone().to(DEV), bufs[2].clone().to(DEV)]


def _reference(
    x: Tensor, y: Tensor, gc: Tensor, dp: Tensor, bufs: list[Tensor], chunk: int, same_out: bool
) -> list[Tensor]:
    """dx, dy, dgc after the additions, float64 (dx and dy both the one sum when ``same_out``)."""
    b, h, n, dk = x.shape
    np_ = gc.shape[2]
    nc = np_ // chunk
    xp, yp = (F.pad(t.double(), (0, 0, 0, np_ - n)).view(b, h, nc, chunk, dk) for t in (x, y))
    gcc = gc.double().view(b, h, nc, chunk, dk)
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    d = torch.where(keep[..., None], gcc[..., :, None, :] - gcc[..., None, :, :], float("-inf")).exp()
    dpc = (dp.double().view(b, h, nc, chunk, chunk) * keep).unsqueeze(-1)
    ddx = (dpc * d * yp[..., None, :, :]).sum(-2)  # sum over j <= t
    ddy = (dpc * d * xp[..., :, None, :]).sum(-3)  # sum over t >= j
    dg = xp * ddx - yp * ddy
    ddx, ddy, dg = (t.reshape(b, h, np_, dk) for t in (ddx, ddy, dg))
    dx0, dy0, dg0 = (t.double().to(x.device) for t in bufs)
    if same_out:
        return [dx0 + ddx + ddy, dx0 + ddx + ddy, dg0 + dg]
    return [dx0 + ddx, dy0 + ddy, dg0 + dg]


def _old(
    x: Tensor, y: Tensor, gc: Tensor, dp: Tensor, bufs: list[Tensor], chunk: int, same_out: bool
) -> None:
    """``score_bwd_kernel`` as ``delta_bwd_channel_launch`` launches it."""
    from attnlab.kernels.linear import op
    from attnlab.kernels.linear.launch import SUB, _prec, _upcast
    from attnlab.kernels.triton_utils import head_block

    b, h, n, dk = x.shape
    np_ = gc.shape[2]
    op.score_bwd_kernel[(np_ // SUB, b * h)](
        x, y, gc, dp, *bufs, n, np_, dk,
        SAME_OUT=same_out, BT=chunk, BS=SUB, BK=head_block(dk), DOT_PREC=_prec(x), UPCAST=_upcast(x), num_warps=4,
    )  # fmt: skip


def _new(
    x: Tensor,
    y: Tensor,
    gc: Tensor,
    dp: Tensor,
    bufs: list[Tensor],
    chunk: int,
    same_out: bool,
    f32: bool = False,
) -> None:
    from attnlab.kernels.linear.launch import _prec, _upcast
    from attnlab.kernels.linear.launch_scores import score_bwd_v2

    score_bwd_v2(x, y, gc, dp, *bufs, same_out=same_out, chunk=chunk, prec=_prec(x), upcast=_upcast(x) or f32)


def _tol(dtype: torch.dtype, f32: bool) -> float:
    """16-bit dot operands on a GPU round dP and the decayed rows (2^-9: measured on an H100 up to 3e-3 of
    the largest magnitude, as the sub-block kernel); float32 ones (the interpreter's, or ``upcast``: tf32
    dots for 16-bit inputs, 1e-3) are exact to float32 rounding with float32 inputs."""
    if not on_cuda() or dtype == torch.float32:
        return 2e-5
    return 4e-3 if f32 else 1e-2


@pytest.mark.parametrize("same_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dk", [8, 40, 64])
@pytest.mark.parametrize(("chunk", "n"), [(16, 45), (32, 70), (64, 70)])
def test_score_bwd_v2_matches_the_sub_block_kernel_and_float64(
    chunk: int, n: int, dk: int, dtype: torch.dtype, same_out: bool
) -> None:
    """dx, dy, dgc after the additions (random initial contents, a partial last chunk, B*H = 3, K not a
    multiple of the slice, strong decays on a third of the channels): the new launcher against float64
    and against the sub-block kernel; with ``same_out`` x = y and dx, dy one buffer, dP strictly lower."""
    x, y, gc, dp, bufs = _inputs((1, 3), n, dk, chunk, dtype, same_out)
    want = _reference(x, y, gc, dp, bufs, chunk, same_out)
    old, new = _bufs(bufs, same_out), _bufs(bufs, same_out)
    _old(x, y, gc, dp, old, chunk, same_out)
    _new(x, y, gc, dp, new, chunk, same_out)
    tol = _tol(dtype, False)
    for name, got, ref, prev in zip(("dx", "dy", "dgc"), new, want, old, strict=True):
        assert torch.isfinite(got).all()
        _close(f"{name} vs float64", got.double(), ref, tol)
        _close(f"{name} vs score_bwd_kernel", got, prev, tol)
    if on_cuda() and dtype == torch.bfloat16:  # (float32 operands: tf32 dots)
        wide = _bufs(bufs, same_out)
        _new(x, y, gc, dp, wide, chunk, same_out, f32=True)
        for name, got, ref in zip(("dx", "dy", "dgc"), wide, want, strict=True):
            _close(f"{name} (float32 operands) vs float64", got.double(), ref, _tol(dtype, True))


@pytest.mark.parametrize(("dtype", "bks", "unroll"), [(torch.float32, 16, True), (torch.bfloat16, 32, False)])
def test_score_bwd_v2_slices_and_levels(
    dtype: torch.dtype, bks: int, unroll: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other slice widths (several masked slices at K = 40) and the levels unrolled or in a loop, and dP
    above the diagonal never read (NaN there changes nothing)."""
    from attnlab.kernels.linear import launch_scores

    for name, value in (("BKS", bks), ("UNROLL", unroll)):
        monkeypatch.setattr(launch_scores, f"SCORE_BWD_{name}", value)
        monkeypatch.setattr(launch_scores, f"SCORE_BWD_{name}_F32", value)
    chunk = 32
    x, y, gc, dp, bufs = _inputs((2, 1), 50, 40, chunk, dtype, False, seed=1)
    want = _reference(x, y, gc, dp, bufs, chunk, False)
    upper = (
        torch.ones(chunk, chunk, dtype=torch.bool, device=dp.device).triu(1).repeat(dp.shape[2] // chunk, 1)
    )
    dp = dp.masked_fill(upper, float("nan"))
    new = _bufs(bufs, False)
    _new(x, y, gc, dp, new, chunk, False)
    for name, got, ref in zip(("dx", "dy", "dgc"), new, want, strict=True):
        _close(name, got.double(), ref, _tol(dtype, False))
