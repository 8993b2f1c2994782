"""The delta rule's two intra-chunk score products of per-channel gates (KDA) in one launch
(``attnlab.kernels.linear.op.DELTA_INTRA_PAIR``, ``intra_scores_pair``): the strict k k^T scores (with or
without beta) and the q k^T scores, k, the gates and the exps loaded and made once. Checked against the two
launches of ``intra_scores`` (float16 and float32, float32 or 16-bit dot operands, lengths off the chunk
grid), and the chunk op with the switch against without it: the output, final state and every gradient,
with the scores kept from the forward and recomputed by the backward, the L2 norm fused, packed sequences.
Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.testing import device_under_test

DEV = device_under_test()
#: Equal bit for bit in Triton's interpreter (the same operations in the same order); on a GPU the
#: compiler may schedule the shared kernel differently: within 1e-6 of the largest value.
TOL = 0.0 if DEV.type == "cpu" else 1e-6


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _close(name: str, got: Tensor, want: Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if TOL == 0.0:
        assert torch.equal(got, want), f"{name}: {float((got - want).abs().max()):.3e}"
    else:
        scale = float(want.abs().max()) + 1e-12
        assert float((got - want).abs().max()) / scale <= TOL, name


def _qkg(n: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    g = F.logsigmoid(torch.randn(2, 2, n, 16, generator=gen) + 2.0)
    beta = torch.rand(2, 2, n, generator=gen)
    return q.to(DEV, dtype), F.normalize(k, dim=-1).to(DEV, dtype), g.to(DEV), beta.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("wide", [True, False], ids=["f32_operands", "input_dtype_operands"])
@pytest.mark.parametrize(("n", "chunk", "with_beta"), [(70, 32, True), (64, 64, False), (5, 16, True)])
def test_the_pair_equals_two_launches(
    dtype: torch.dtype, wide: bool, n: int, chunk: int, with_beta: bool
) -> None:
    op = _op()
    q, k, g, beta = _qkg(n, dtype, seed=n + chunk)
    gc = op.chunk_cumsum(g, 2, 2, n, 16, chunk, q.device)
    b = beta if with_beta else None
    akk, aqk = op.intra_scores_pair(q, k, gc, b, chunk, f32_operands=wide)
    want_akk = op.intra_scores(k, k, gc, b, chunk, strict=True, v2=True, f32_operands=wide)
    want_aqk = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=True, f32_operands=wide)
    _close("A_kk", akk, want_akk)
    _close("A_qk", aqk, want_aqk)
    assert (
        torch.count_nonzero(torch.triu(akk[0, 0, :chunk])) == 0
    )  # (strict: nothing on or above the diagonal)


def _inputs(n: int, seed: int, n_seq: int = 1) -> list[Tensor]:
    """q, k, v float16, beta, g (per channel), h0 (one per sequence: ``n_seq``) float32; one batch row."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, n, 24, generator=gen)
    beta = torch.rand(1, 2, n, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, 16, generator=gen) + 1.0)
    h0 = torch.randn(n_seq, 2, 16, 24, generator=gen)
    return [t.to(DEV) for t in (q.half(), F.normalize(k, dim=-1).half(), v.half(), beta, g, h0)]


def _run(
    xs: list[Tensor], pair: bool, mp: pytest.MonkeyPatch, l2: bool, cu: list[int] | None
) -> list[Tensor]:
    op = _op()
    mp.setattr(op, "DELTA_INTRA_PAIR", pair)
    leaves = [t.clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = leaves
    if cu is None:
        o, s = op.delta_chunk(q, k, v, beta, g, 0.3, h0, 32, l2)
    else:
        o, s = op.delta_chunk_varlen(q, k, v, beta, g, 0.3, h0, 32, torch.tensor(cu).to(DEV), l2)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen).to(DEV).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (s * ds).sum(), leaves)
    return [o.detach(), s.detach(), *grads]


@pytest.mark.parametrize("save_scores", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize(("l2", "cu"), [(False, None), (True, None), (False, [0, 20, 70])])
def test_the_chunk_op_gives_the_same_results(
    save_scores: bool, l2: bool, cu: list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n = 70, chunk 32 (the last chunk padded): output, final state and every gradient as two launches
    give; the scores kept by the forward (``DELTA_SAVE_SCORES``) or recomputed by the backward."""
    monkeypatch.setattr(_op(), "DELTA_SAVE_SCORES", save_scores)
    xs = _inputs(70, seed=4, n_seq=1 if cu is None else len(cu) - 1)
    on = _run(xs, True, monkeypatch, l2, cu)
    off = _run(xs, False, monkeypatch, l2, cu)
    for name, a, b in zip(("o", "state", "dq", "dk", "dv", "dbeta", "dg", "dh0"), on, off, strict=True):
        assert torch.isfinite(a).all(), name
        _close(name, a, b)


@pytest.mark.parametrize("save_scores", [True, False], ids=["kept", "recomputed"])
def test_one_launch_replaces_the_two(save_scores: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the switch the forward (and a recomputing backward) never calls ``intra_scores``: the pair makes
    both products, once per pass that needs them."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_SAVE_SCORES", save_scores)
    monkeypatch.setattr(op, "DELTA_INTRA_PAIR", True)
    pairs: list[bool] = []
    real = op.intra_scores_pair

    def counted(
        q: Tensor, k: Tensor, gc: Tensor, beta: Tensor | None, chunk: int, **kw: bool
    ) -> tuple[Tensor, Tensor]:
        pairs.append(beta is not None)
        return real(q, k, gc, beta, chunk, **kw)  # type: ignore[no-any-return]

    def refused(*a: object, **kw: object) -> Tensor:
        raise AssertionError("intra_scores called with DELTA_INTRA_PAIR on")

    monkeypatch.setattr(op, "intra_scores_pair", counted)
    monkeypatch.setattr(op, "intra_scores", refused)
    _run(_inputs(40, seed=6), True, monkeypatch, False, None)
    # (kept: the forward's pair without beta, B; recomputed: the forward's with beta, then the backward's)
    assert pairs == ([False] if save_scores else [True, False])
