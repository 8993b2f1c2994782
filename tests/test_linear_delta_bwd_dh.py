"""The delta rule's backward sequential pass in two launches (``op.DELTA_BWD_DH_V2``:
``chunk_delta_dh.py``) against the token-by-token recurrence and against the single-launch pass: every
gradient, per-channel gates, a gate per token and none, odd lengths, several chunks and value blocks, a
final-state gradient, and packed sequences."""

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


def _inputs(n: int, dk: int, dv: int, gate: str, seed: int = 0) -> list[Tensor | None]:
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
    return [None if t is None else t.to(DEV) for t in (q, k, v, beta, g, h0)]


def _grads(xs: list[Tensor | None], chunk: int, v2: bool, mp: pytest.MonkeyPatch) -> tuple[Tensor, ...]:
    op = _op()
    mp.setattr(op, "DELTA_BWD_DH_V2", v2)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], chunk)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    return torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in leaves if t is not None])


def _reference(xs: list[Tensor | None]) -> tuple[Tensor, ...]:
    ref = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = ref
    assert q is not None and k is not None and v is not None and beta is not None
    o, s = delta_recurrence(q, k, v, beta, g, 0.3, h0)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    return torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in ref if t is not None])


@pytest.mark.parametrize(
    ("n", "chunk", "dk", "dv", "gate"),
    [(63, 16, 8, 40, "channel"), (70, 32, 16, 8, "head"), (33, 16, 8, 8, "none"), (16, 16, 8, 8, "channel")],
    ids=["n63-channel-3-value-blocks", "n70-head-gate", "n33-deltanet", "one-chunk"],
)
def test_two_launch_pass_matches_the_recurrence_and_the_one_launch_pass(
    n: int, chunk: int, dk: int, dv: int, gate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dv = 40 against DELTA_BV = 32: two value blocks, the second masked (and one du-local block of 64)."""
    xs = _inputs(n, dk, dv, gate)
    got = _grads(xs, chunk, True, monkeypatch)
    old = _grads(xs, chunk, False, monkeypatch)
    want = _reference(xs)
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b, c in zip(names, got, want, old, strict=True):
        torch.testing.assert_close(
            a, b, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm} vs recurrence: {m}"
        )
        torch.testing.assert_close(
            a, c, atol=2e-5, rtol=2e-5, msg=lambda m, nm=name: f"{nm} vs one launch: {m}"
        )


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_two_launch_pass_on_packed_sequences(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed sequences (an empty one, one shorter than a chunk, one over two chunk boundaries; VARLEN):
    the two-launch pass gives the one-launch pass's gradients."""
    op = _op()
    cu = torch.tensor([0, 5, 5, 40, 61])
    n = 61
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 2, n, 8, generator=gen)
    beta = torch.rand(1, 2, n, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, 8 if gate == "channel" else 1, generator=gen) + 1.0)
    xs = [t.to(DEV) for t in (q, k, v, beta, g)]
    outs = []
    for v2 in (True, False):
        monkeypatch.setattr(op, "DELTA_BWD_DH_V2", v2)
        leaves = [t.clone().requires_grad_(True) for t in xs]
        o, s = op.delta_chunk_varlen(*leaves, 0.3, None, 16, cu.to(DEV))
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
        ds = torch.randn(s.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
        outs.append(torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves))
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg"), *outs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, nm=name: f"{nm}: {m}")


@pytest.mark.parametrize("skip", [True, False], ids=["unmaterialised", "zero-filled"])
@pytest.mark.parametrize("loss", ["out", "state"])
@pytest.mark.parametrize("gate", ["head", "channel"])
def test_a_loss_on_the_output_or_the_final_state_alone(
    gate: str, loss: str, skip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only o, or only the final state, in the loss: with ``DELTA_SKIP_ZERO_GRADS`` the backward gets None
    for the unused output (a zero do made in the backward; no dht) and no zero-filled gradients for the
    saved outputs; the gradients are the recurrence's either way."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_SKIP_ZERO_GRADS", skip)
    xs = _inputs(40, 8, 8, gate)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    ref = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], 16)
    q, k, v, beta, g, h0 = ref
    assert q is not None and k is not None and v is not None and beta is not None
    ro, rs = delta_recurrence(q, k, v, beta, g, 0.3, h0)
    gen = torch.Generator().manual_seed(7)
    w_o, w_s = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad(
        (o * w_o).sum() if loss == "out" else (s * w_s).sum(), [t for t in leaves if t is not None]
    )
    want = torch.autograd.grad(
        (ro * w_o).sum() if loss == "out" else (rs * w_s).sum(),
        [t for t in ref if t is not None],
        allow_unused=True,
    )
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), got, want, strict=True):
        want_b = torch.zeros_like(a) if b is None else b  # (the final state does not depend on q)
        torch.testing.assert_close(a, want_b, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")


@pytest.mark.parametrize("gate", ["head", "none"])
def test_transposed_twins_as_transposes(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DELTA_BWD_TRANS``: the scalar-gate per-chunk backward's transposed products taken as transposes
    (value slices of 16 over V = 40: three slices, the last masked) give the recurrence's gradients and
    the dot-made twins' to float32 rounding."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_BWD_BVB", 16)
    xs = _inputs(63, 8, 40, gate)
    want = _reference(xs)
    monkeypatch.setattr(op, "DELTA_BWD_TRANS", True)
    got = _grads(xs, 16, True, monkeypatch)
    monkeypatch.setattr(op, "DELTA_BWD_TRANS", False)
    old = _grads(xs, 16, True, monkeypatch)
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b, c in zip(names, got, want, old, strict=True):
        torch.testing.assert_close(
            a, b, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm} vs recurrence: {m}"
        )
        torch.testing.assert_close(a, c, atol=2e-5, rtol=2e-5, msg=lambda m, nm=name: f"{nm} vs twins: {m}")


def test_kda_score_backward_by_split_levels_in_the_whole_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DELTA_SCORE_BWD_V2`` (16-bit inputs only: bf16 here; float32 ones keep the sub-block kernel):
    KDA's gradients with the split-level score backward equal the sub-block kernel's (to bf16 rounding of
    the stored gradients) and the fp32 recurrence's (to bf16 accuracy)."""
    op = _op()
    xs = _inputs(70, 16, 16, "channel", seed=4)
    low = [None if t is None else (t.to(torch.bfloat16) if i < 3 else t) for i, t in enumerate(xs)]
    launched = []
    real = op.score_bwd_v2_kernel

    class Spy:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(op, "score_bwd_v2_kernel", Spy())
    grads = {}
    for v2 in (True, False):
        monkeypatch.setattr(op, "DELTA_SCORE_BWD_V2", v2)
        grads[v2] = _grads(low, 32, True, monkeypatch)
    assert len(launched) == 2  # (q k^T and the strict k k^T, with the switch on only)
    want = _reference([None if t is None else t.float() for t in low])
    for name, a, b, c in zip(
        ("dq", "dk", "dv", "dbeta", "dg", "dh0"), grads[True], grads[False], want, strict=True
    ):
        torch.testing.assert_close(
            a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m, nm=name: f"{nm}: {m}"
        )
        torch.testing.assert_close(
            a.float(), c, atol=5e-2, rtol=5e-2, msg=lambda m, nm=name: f"{nm} vs ref: {m}"
        )


@pytest.mark.parametrize("gate", ["head", "channel", "none"])
def test_sixteen_bit_operands_of_the_reverse_pass(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DELTA_BWD_DH_LOWP`` (the GPU's default for 16-bit inputs; the CPU interpreter is told it is not
    interpreting, so the 16-bit branches run): fp16 inputs, every gradient within fp16 accuracy of the fp32
    recurrence and no further from it than float32 operands (twice their error plus 1e-3)."""
    from attnlab.kernels.linear import launch_delta

    op = _op()
    monkeypatch.setattr(launch_delta, "IMPORTED_INTERPRETED", False)
    xs = _inputs(70, 24, 40, gate, seed=5)
    low = [None if t is None else (t.half() if i < 3 else t) for i, t in enumerate(xs)]
    want = _reference([None if t is None else t.float() for t in low])
    got = {}
    for lowp in (True, False):
        monkeypatch.setattr(op, "DELTA_BWD_DH_LOWP", lowp)
        got[lowp] = _grads(low, 32, True, monkeypatch)
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b, c in zip(names, got[True], got[False], want, strict=True):
        err_lowp = float((a.float() - c).abs().max())
        err_f32 = float((b.float() - c).abs().max())
        assert err_lowp <= 2 * err_f32 + 1e-3, (
            f"{name}: 16-bit operands {err_lowp:.3g}, float32 {err_f32:.3g}"
        )
        torch.testing.assert_close(a.float(), c, atol=3e-2, rtol=3e-2, msg=lambda m, nm=name: f"{nm}: {m}")


@pytest.mark.parametrize("loss", ["out", "state"])
@pytest.mark.parametrize("skip", [True, False], ids=["unmaterialised", "zero-filled"])
def test_unused_outputs_reach_the_backward_as_none(
    skip: bool, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chunk op's backward receives: with ``DELTA_SKIP_ZERO_GRADS`` None for the output the loss
    does not use (then a zero do is made inside, and no dht), else zero-filled gradients."""
    from attnlab.kernels.linear import custom_ops

    op = _op()
    monkeypatch.setattr(op, "DELTA_SKIP_ZERO_GRADS", skip)
    seen: dict[str, Tensor | None] = {}
    real = custom_ops.delta_chunk_bwd

    def spy(*args: object) -> object:
        seen["do"], seen["dht"] = args[9], args[10]  # type: ignore[assignment]
        return real(*args)

    monkeypatch.setattr(custom_ops, "delta_chunk_bwd", spy)
    xs = _inputs(40, 8, 8, "head")
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], 16)
    (o.sum() if loss == "out" else s.sum()).backward()
    do, dht = seen["do"], seen["dht"]
    assert do is not None  # (always a tensor for the kernels)
    if loss == "state":
        assert torch.count_nonzero(do) == 0 and dht is not None and torch.count_nonzero(dht) > 0
    elif skip:
        assert dht is None and torch.count_nonzero(do) > 0
    else:
        assert dht is not None and torch.count_nonzero(dht) == 0


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_packed_sequences_at_chunk_64_match_each_sequence_alone(gate: str) -> None:
    """Packed sequences (cumulative lengths 0, 5, 5, 70, 130, 131: an empty one, one of a single token, one
    over a chunk boundary) at chunk 64 with an initial state each: every gradient equals the recurrence
    run on each sequence alone."""
    op = _op()
    cu = [0, 5, 5, 70, 130, 131]
    n = cu[-1]
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, 2, n, 8, generator=gen)
    beta = torch.rand(1, 2, n, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, n, 8 if gate == "channel" else 1, generator=gen) + 1.0)
    h0 = torch.randn(len(cu) - 1, 2, 8, 8, generator=gen)
    xs = [t.to(DEV) for t in (q, k, v, beta, g, h0)]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    ref = [t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk_varlen(*leaves[:5], 0.3, leaves[5], 64, torch.tensor(cu).to(DEV))
    outs, states = [], []
    for i in range(len(cu) - 1):
        t0, t1 = cu[i], cu[i + 1]
        if t0 == t1:
            states.append(ref[5][i : i + 1])
            continue
        rq, rk, rv, rb, rg = (t[:, :, t0:t1] for t in ref[:5])
        oi, si = delta_recurrence(rq, rk, rv, rb, rg, 0.3, ref[5][i : i + 1])
        outs.append(oi)
        states.append(si)
    ro, rs = torch.cat(outs, 2), torch.cat(states, 0)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
