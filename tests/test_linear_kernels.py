"""The linear family's Triton kernels (``attnlab/kernels/linear``) against the token-by-token recurrence:
output, final state and every gradient (q, k, v, the log-decays g, the initial state), at odd lengths and
at chunk boundaries; the recurrent step kernel (decode); the launchers' refusals. Tiny shapes: on a CPU
machine the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence, gated_recurrence
from attnlab.testing import device_under_test, on_cuda

DEV = device_under_test()


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _inputs(
    n: int, dk: int, dv: int, g_shift: float | None, *, b: int = 1, h: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """q, k, v, g (log-decays; None without), h0, on the device under test, fp32."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen)
    g = None if g_shift is None else F.logsigmoid(torch.randn(b, h, n, dk, generator=gen) + g_shift)
    h0 = torch.randn(b, h, dk, dv, generator=gen)
    return q.to(DEV), k.to(DEV), v.to(DEV), (None if g is None else g.to(DEV)), h0.to(DEV)


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _compare_with_recurrence(
    xs: Sequence[Tensor | None], chunk: int, scale: float = 0.3, tol: float = 2e-5
) -> None:
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    ref_leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    q, k, v, g, h0 = leaves
    o, s = _op().gla_chunk(q, k, v, g, scale, h0, chunk)
    rq, rk, rv, rg, rh0 = ref_leaves
    assert q is not None and rq is not None and rk is not None and rv is not None
    ro, rs = gated_recurrence(rq, rk, rv, rg, scale, rh0)
    assert o.dtype == q.dtype and s.dtype == torch.float32
    torch.testing.assert_close(o, ro, atol=tol, rtol=tol)
    torch.testing.assert_close(s, rs, atol=tol, rtol=tol)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    wrt = [t for t in leaves if t is not None]
    ref_wrt = [t for t in ref_leaves if t is not None]
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), wrt)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref_wrt)
    names = [n for n, t in zip(("dq", "dk", "dv", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        _close(name, a, b, tol * 5)


@pytest.mark.parametrize(
    ("n", "chunk"),
    [(1, 16), (63, 16), (100, 32), (32, 16), (64, 64)],
    ids=["n1", "n63", "n100-chunk32", "two-whole-chunks", "one-whole-chunk64"],
)
def test_gla_chunk_kernel_matches_the_recurrence(n: int, chunk: int, poison_empty: None) -> None:
    _compare_with_recurrence(_inputs(n, 8, 12, 1.0), chunk)


@pytest.mark.parametrize(
    "gates", ["none", "near-zero-decay", "near-one-decay", "head", "head-near-zero-decay", "head-as-b-h-n-1"]
)
def test_gla_chunk_kernel_without_decay_and_at_decay_extremes(gates: str) -> None:
    """Per-channel gates and gates shared by the channels (lightning's per-head decay broadcast over
    (B, H, N, K), or a (B, H, N, 1) gate: the scalar-gate kernels), at their extremes."""
    xs: list[Tensor | None] = list(_inputs(33, 8, 8, 1.0))
    g = xs[3]
    assert g is not None
    if gates == "none":
        xs[3] = None
    elif gates == "near-zero-decay":  # decay ~ e^-30 per token: exp(-G) over a chunk would overflow
        xs[3] = -30.0 - torch.rand_like(g)
    elif gates == "near-one-decay":  # decay 1 - 1e-6
        xs[3] = torch.full_like(g, -1e-6)
    elif gates == "head":  # a leaf of shape (B, H, 1, 1), expanded inside (its gradient reduces back)
        xs[3] = torch.tensor([-0.3, -0.05]).to(DEV).view(1, 2, 1, 1)
    elif gates == "head-near-zero-decay":
        xs[3] = (-30.0 - torch.rand(1, 2, 33, 1)).to(DEV)
    else:
        xs[3] = g[..., :1].clone()
    _compare_with_recurrence(xs, 16)


def test_gates_shared_by_the_channels_take_the_scalar_gate_kernels() -> None:
    op = _op()
    g = torch.randn(1, 2, 5, 1)
    assert op._scalar_gate(g, 1, 2, 5, 8)[0]
    assert op._scalar_gate(torch.randn(1, 2, 1, 1).expand(1, 2, 5, 8), 1, 2, 5, 8)[0]
    assert op._scalar_gate(None, 1, 2, 5, 8) == (True, None)
    assert not op._scalar_gate(torch.randn(1, 2, 5, 8), 1, 2, 5, 8)[0]


def test_gla_chunk_kernel_with_several_key_slices_and_value_blocks() -> None:
    """K = 40 (two 32-channel slices of a 64 tile) and V = 80 (two 64-wide value blocks forward)."""
    _compare_with_recurrence(_inputs(20, 40, 80, 1.0), 16, tol=4e-5)


def test_gla_chunk_kernel_in_bfloat16_meets_the_accuracy_rule() -> None:
    """Error against the fp32 recurrence at most 2x that of the same recurrence run in bfloat16."""
    q, k, v, g, h0 = _inputs(40, 16, 16, 2.0)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    o, s = _op().gla_chunk(qb, kb, vb, g, 0.25, h0, 16)
    ro, rs = gated_recurrence(qb.float(), kb.float(), vb.float(), g, 0.25, h0)
    lo, ls = gated_recurrence(qb, kb, vb, g, 0.25, h0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    for got, ref, low in ((o, ro, lo), (s, rs, ls)):  # (the state accumulates in fp32 from bf16 products)
        err, err_low = (got.float() - ref).abs().max(), (low.float() - ref).abs().max()
        assert err <= 2 * err_low + 1e-5 * (1 + ref.abs().max()), (float(err), float(err_low))


@pytest.mark.parametrize("rule", ["gla", "gla-no-decay", "delta", "delta-gated"])
def test_recurrent_step_kernel_matches_the_recurrence(rule: str) -> None:
    q, k, v, g, h0 = _inputs(3, 8, 12, 1.0)
    if rule.endswith("no-decay"):
        g = None
    beta = torch.rand(1, 2, 3).to(DEV) if rule.startswith("delta") else None
    if rule == "delta":
        g = None
    if beta is not None:
        k = F.normalize(k, dim=-1)
    o, s = _op().linear_step(q, k, v, g, beta, h0, 0.3, False, None)
    if beta is None:
        ro, rs = gated_recurrence(q, k, v, g, 0.3, h0)
    else:
        ro, rs = delta_recurrence(q, k, v, beta, g, 0.3, h0)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)


def test_the_step_skips_the_custom_op_in_eager_and_traces_it_under_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eager ``linear_step`` launches directly (the custom op's dispatch layers cost most of a decode
    step's host time; it has no autograd to lose); under ``torch.compile(fullgraph=True)`` it goes
    through ``attnlab::linear_step`` (no graph break), with the same result."""
    op = _op()
    q, k, v, g, h0 = _inputs(1, 8, 12, 1.0)
    beta = torch.rand(1, 2, 1).to(DEV)
    k = F.normalize(k, dim=-1)
    calls: list[int] = []
    real_op = op.linear_step_op

    def counted(*a: object) -> tuple[Tensor, Tensor]:
        calls.append(1)
        return real_op(*a)  # type: ignore[no-any-return]

    monkeypatch.setattr(op, "linear_step_op", counted)
    want = op.linear_step(q, k, v, g, beta, h0, 0.3, False, None)
    assert calls == []  # eager: no custom-op dispatch
    monkeypatch.setattr(op, "linear_step_op", real_op)
    torch._dynamo.reset()
    targets: list[str] = []

    def record(gm: torch.fx.GraphModule, _: object) -> object:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    step = torch.compile(lambda *a: op.linear_step(*a, 0.3, False, None), fullgraph=True, backend=record)
    got = step(q, k, v, g, beta, h0)
    assert "attnlab.linear_step.default" in targets, targets
    # tracing without dynamo (make_fx over fake tensors) goes through the op too, with its fake shapes
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda *a: op.linear_step(*a, 0.3, False, None), tracing_mode="fake")(q, k, v, g, beta, h0)
    assert any(str(n.target) == "attnlab.linear_step.default" for n in gm.graph.nodes)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gate", ["per-token", "per-channel", "none"])
def test_step_kernel_normalises_q_k_itself_and_takes_a_gate_per_token(gate: str) -> None:
    """The decode path of ``delta_chunk(..., qk_l2norm=True)``: q and k normalised in the kernel, a gate
    (B, H, N, 1) read as one value per token (no (B, H, N, K) copy), equal to the recurrence on
    normalised q, k; and the same for ``gla_chunk`` under a per-token gate."""
    from attnlab.kernels.linear.naive import l2norm

    op = _op()
    q, k, v, g, h0 = _inputs(3, 8, 12, 1.0)
    assert g is not None
    gg = {"per-token": g[..., :1], "per-channel": g, "none": None}[gate]
    beta = torch.rand(1, 2, 3).to(DEV)
    with torch.no_grad():
        o, s = op.delta_chunk(q, k, v, beta, gg, 0.3, h0, 16, qk_l2norm=True)
    ro, rs = delta_recurrence(l2norm(q), l2norm(k), v, beta, gg, 0.3, h0)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)
    if gate == "per-token":
        with torch.no_grad():
            o, s = op.gla_chunk(q, k, v, gg, 0.3, h0, 16)
        ro, rs = gated_recurrence(q, k, v, gg, 0.3, h0)
        torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)


def test_gla_backward_takes_the_forwards_intra_chunk_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-channel gates: the forward's intra-chunk scores are kept for the backward (one
    ``intra_scores`` launch per forward + backward, not two), with the gradients of the recurrence."""
    op = _op()
    calls = []
    real = op.intra_scores

    def counted(*a: object, **kw: object) -> Tensor:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(op, "intra_scores", counted)
    _compare_with_recurrence(_inputs(40, 8, 8, 1.0), 16)
    assert calls == [1]


def test_short_calls_without_gradients_take_the_step_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op()
    calls = []
    real = op.linear_step

    def counted(*a: object) -> tuple[Tensor, Tensor]:
        calls.append(1)
        return real(*a)  # type: ignore[no-any-return]

    monkeypatch.setattr(op, "linear_step", counted)
    q, k, v, g, h0 = _inputs(2, 8, 8, 1.0)
    with torch.no_grad():
        o, s = op.gla_chunk(q, k, v, g, 0.3, h0, 16)
    assert calls == [1]
    ro, rs = gated_recurrence(q, k, v, g, 0.3, h0)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)


def test_the_launchers_refuse_what_the_kernels_cannot_take() -> None:
    op = _op()
    q, k, v, g, h0 = _inputs(20, 8, 8, 1.0)
    gc = op.chunk_cumsum(g, 1, 2, 20, 8, 16, q.device)
    with pytest.raises(ValueError, match="the Triton kernels take chunk sizes 16, 32, 64, not chunk=24"):
        op.gla_fwd_launch(q, k, v, gc, h0, 0.3, 24, False)
    with pytest.raises(ValueError, match="key feature dims up to 256, got 300"):
        op.gla_fwd_launch(
            torch.zeros(1, 1, 4, 300), torch.zeros(1, 1, 4, 300), v[:, :1, :4], gc, None, 1.0, 16, False
        )
    with pytest.raises(ValueError, match=r"q \(1, 2, 20, 8\), k \(1, 2, 19, 8\)"):
        op.gla_fwd_launch(q, k[:, :, :19], v, gc, h0, 0.3, 16, False)


@pytest.mark.skipif(on_cuda(), reason="checks the interpreter's bfloat16 path")
def test_interpreter_bfloat16_dots_are_upcast() -> None:
    assert _op()._upcast(torch.zeros(1, dtype=torch.bfloat16)) is True


@pytest.mark.parametrize(
    ("n", "chunk", "gate"),
    [(1, 16, "channel"), (63, 16, "channel"), (100, 64, "head"), (32, 32, "none"), (40, 16, "strong"),
     (70, 64, "channel"), (63, 16, "head"), (40, 16, "head-strong")],
    ids=["n1", "n63", "n100-chunk64-head-gate", "one-whole-chunk32-deltanet", "n40-near-zero-decay",
         "n70-chunk64", "n63-head-gate", "n40-head-gate-near-zero-decay"],
)  # fmt: skip
def test_delta_kernels_match_the_recurrence(n: int, chunk: int, gate: str, poison_empty: None) -> None:
    """Output, final state and the gradients of q, k, v, beta, g and the initial state (forward: the
    chunked WY/UT form; backward chunked; per-channel gates, per-head gates and plain DeltaNet)."""
    q, k, v, g, h0 = _inputs(n, 8, 8, 1.0, h=1)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(5)).to(DEV)
    assert g is not None
    if gate == "head":
        g = g[..., :1].clone()
    elif gate == "none":
        g = None
    elif gate == "strong":  # decay ~ e^-30 per token on half the channels
        g = torch.where(torch.arange(8).to(DEV) % 2 == 0, -30.0, g)
    elif gate == "head-strong":  # decay ~ e^-30 on every other token
        g = torch.where(torch.arange(n).to(DEV)[:, None] % 2 == 0, -30.0, g[..., :1])
    xs: list[Tensor | None] = [q, k, v, beta, g, h0]
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    o, s = _op().delta_chunk(*leaves[:5], 0.3, leaves[5], chunk)
    rq, rk, rv, rb, rg, rh0 = ref
    assert rq is not None and rk is not None and rv is not None and rb is not None
    ro, rs = delta_recurrence(rq, rk, rv, rb, rg, 0.3, rh0)
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in leaves if t is not None])
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), [t for t in ref if t is not None])
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        _close(name, a, b, 1e-4)


def test_the_custom_ops_pass_opcheck() -> None:
    """Schema, fake tensors (torch.compile traces them), autograd registration and AOT dispatch."""
    op = _op()
    q, k, v, g, h0 = _inputs(5, 8, 8, 1.0, h=1)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    gc = op.chunk_cumsum(g, 1, 1, 5, 8, 16, q.device).requires_grad_(True)
    h0 = h0.requires_grad_(True)
    torch.library.opcheck(op.gla_chunk_fwd, (*leaves, gc, h0, 0.3, 16, True))
    beta = torch.rand(1, 1, 5).to(DEV).requires_grad_(True)
    g = g.requires_grad_(True)  # type: ignore[union-attr]
    torch.library.opcheck(op.delta_chunk_fwd, (*leaves, beta, g, h0, 0.3, 16, True))
    g1 = g[..., :1].detach().clone().requires_grad_(True)  # one gate per token: the chunked backward
    torch.library.opcheck(op.delta_chunk_fwd, (*leaves, beta, g1, h0, 0.3, 16, True))
    torch.library.opcheck(op.linear_step_op, (q, k, v, None, None, h0.detach(), 0.3, False, None))


def test_the_step_ops_mutated_argument_has_no_default() -> None:
    """torch 2.11 (the H100's) drops a trailing argument equal to its default when it boxes a call, and
    its version bump of a mutated argument then indexes past the end: ``bad`` (mutated, Optional) and
    the flag before it must be required in the schema, so a call with ``bad=None`` keeps its arity."""
    args = {a.name: a for a in _op().linear_step_op._opoverload._schema.arguments}
    assert not args["bad"].has_default_value() and not args["qk_l2norm"].has_default_value()


def _per_sequence(rule: str, xs: list[Tensor | None], cu: list[int]) -> tuple[Tensor, Tensor]:
    """The recurrence run on each packed sequence alone from its own initial state: (o, final states)."""
    outs, states = [], []
    h0 = xs[-1]
    assert h0 is not None
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        if a == b:  # an empty sequence keeps its initial state
            states.append(h0[i : i + 1])
            continue
        part = [None if t is None else t[:, :, a:b] for t in xs[:-1]]
        q, k, v = part[0], part[1], part[2]
        assert q is not None and k is not None and v is not None
        if rule == "delta":
            beta = part[3]
            assert beta is not None
            o, s = delta_recurrence(q, k, v, beta, part[4], 0.3, h0[i : i + 1])
        else:
            o, s = gated_recurrence(q, k, v, part[3], 0.3, h0[i : i + 1])
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 2), torch.cat(states, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_delta_rule_normalises_q_k_like_the_unpacked_op(fused: bool) -> None:
    """``delta_chunk_varlen(..., qk_l2norm=True)`` on raw q, k (fused launch or the PyTorch path): output,
    final states and the gradients of the raw q, k (through the norm) equal the recurrence on each
    sequence's normalised q, k alone."""
    from attnlab.kernels.linear.naive import l2norm

    cu = [0, 5, 5, 40, 61]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 61, 8, generator=gen) for _ in range(3))
    h0 = torch.randn(4, 2, 8, 8, generator=gen)
    g = F.logsigmoid(torch.randn(1, 2, 61, 1, generator=gen) + 1)
    beta = torch.rand(1, 2, 61, generator=gen)
    xs = [t.to(DEV) for t in (q, k, v, beta, g, h0)]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    ref = [t.clone().requires_grad_(True) for t in xs]
    cu_t = torch.tensor(cu).to(DEV)
    o, s = _op().delta_chunk_varlen(*leaves[:5], 0.3, leaves[5], 16, cu_t, True, fused)
    normed: list[Tensor | None] = [l2norm(ref[0]), l2norm(ref[1]), *ref[2:]]
    ro, rs = _per_sequence("delta", normed, cu)
    _close("o", o, ro, 2e-5)
    _close("state", s, rs, 2e-5)
    gen = torch.Generator().manual_seed(9)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _close(f"gradient {i}", a, b, 1e-4)


@pytest.mark.parametrize("rule", ["lightning", "gla", "gated_delta", "deltanet", "kda"])
def test_packed_sequences_run_each_sequence_alone(rule: str) -> None:
    """cu_seqlens (an empty sequence, one shorter than a chunk, one over two chunk boundaries): output,
    final state per sequence and every gradient equal the recurrence run on each sequence alone."""
    cu = [0, 5, 5, 40, 61]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 61, 8, generator=gen) for _ in range(3))
    h0 = torch.randn(4, 2, 8, 8, generator=gen)
    channels = 8 if rule in ("gla", "kda") else 1
    g: Tensor | None = F.logsigmoid(torch.randn(1, 2, 61, channels, generator=gen) + 1)
    if rule == "deltanet":
        g = None
    delta = rule in ("gated_delta", "deltanet", "kda")
    if delta:
        k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 2, 61, generator=gen)
    xs: list[Tensor | None] = [q, k, v, beta, g, h0] if delta else [q, k, v, g, h0]
    xs = [None if t is None else t.to(DEV) for t in xs]
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    ref = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    cu_t = torch.tensor(cu).to(DEV)
    if delta:
        o, s = _op().delta_chunk_varlen(*leaves[:5], 0.3, leaves[5], 16, cu_t)
    else:
        o, s = _op().gla_chunk_varlen(*leaves[:4], 0.3, leaves[4], 16, cu_t)
    ro, rs = _per_sequence("delta" if delta else "gla", ref, cu)
    _close("o", o, ro, 2e-5)
    _close("state", s, rs, 2e-5)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [t for t in leaves if t is not None])
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), [t for t in ref if t is not None])
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _close(f"gradient {i}", a, b, 1e-4)


def test_packed_sequences_refuse_bad_input() -> None:
    op = _op()
    q = torch.randn(1, 2, 10, 8).to(DEV)
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 4, 9\]: expected 0 first, the packed length 10"):
        op.gla_chunk_varlen(q, q, q, None, 0.3, None, 16, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="nondecreasing"):
        op.gla_chunk_varlen(q, q, q, None, 0.3, None, 16, torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        op.gla_chunk_varlen(q, q, q, None, 0.3, None, 16, torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"state \(1, 2, 8, 8\): expected one per sequence and head"):
        op.gla_chunk_varlen(q, q, q, None, 0.3, torch.zeros(1, 2, 8, 8), 16, torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="a batch of 1"):
        q2 = q.expand(2, 2, 10, 8)
        op.gla_chunk_varlen(q2, q2, q2, None, 0.3, None, 16, torch.tensor([0, 10]))


def test_a_shared_memory_refusal_of_the_delta_backward_says_what_to_change() -> None:
    """(What an H100 answers for float32 inputs at K = V = 128: 320 KiB asked, 227 KiB there.)"""
    from triton.runtime.errors import OutOfResources

    q = torch.zeros(1, 1, 4, 128)
    hint = _op()._shared_memory_hint(q)
    with pytest.raises(ValueError, match=r"float32 inputs with head dims \(128\).*Pass bf16 or fp16"), hint:
        raise OutOfResources(327680, 232448, "shared memory")


@pytest.mark.parametrize(
    ("n", "chunk", "gate", "dtype"),
    [(1, 16, "head", "fp32"), (37, 16, "head", "fp32"), (40, 32, "none", "fp32"), (33, 16, "channel", "fp32"),
     (17, 16, "channel", "bf16"), (33, 16, "head", "bf16")],
    ids=["n1-head", "n37-head", "n40-deltanet", "n33-channel", "n17-channel-bf16", "n33-head-bf16"],
)  # fmt: skip
def test_fused_qk_l2norm_matches_the_recurrence(n: int, chunk: int, gate: str, dtype: str) -> None:
    """``delta_chunk(..., qk_l2norm=True)`` with the norm fused (one Triton launch normalises q and k, the
    backward applies its Jacobian in-kernel): output, final state and the gradients of the raw q, k and of
    v, beta, g, h0 against the fp32 token recurrence on l2norm(q), l2norm(k) (autograd through the norm),
    raw q, k of norms far from 1; per-head (GDN) and per-channel (KDA) gates and none (DeltaNet). No
    PyTorch normalisation runs. bf16 inputs: each error against the fp32 recurrence within 2x (3x for
    gradients) that of the old path (PyTorch norm, then the same chunk kernels: the path checked at full
    size on the H100), plus half a bf16 ulp of the peak."""
    from attnlab.kernels.linear.naive import l2norm

    op = _op()
    q, k, v, g, h0 = _inputs(n, 8, 8, 1.0, h=2, seed=3)
    q, k = q * 3.0, k * 0.5
    beta = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(5)).to(DEV)
    assert g is not None
    gg = {"head": g[..., :1].clone(), "channel": g, "none": None}[gate]
    low = torch.bfloat16 if dtype == "bf16" else torch.float32
    xs: list[Tensor | None] = [q.to(low), k.to(low), v.to(low), beta, gg, h0]
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(1, 2, n, 8, generator=gen).to(DEV)
    ds = torch.randn(1, 2, 8, 8, generator=gen).to(DEV)

    def loss_grads(o: Tensor, s: Tensor, wrt: list[Tensor]) -> list[Tensor]:
        return [x.float() for x in torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), wrt)]

    def run(fused: bool) -> list[Tensor]:
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
        real_l2norm = op.l2norm
        try:
            if fused:
                op.l2norm = None  # no PyTorch normalisation on the fused path
            o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], chunk, qk_l2norm=True, fused_l2norm=fused)
        finally:
            op.l2norm = real_l2norm
        assert o.dtype == low and s.dtype == torch.float32
        return [o.float(), s, *loss_grads(o, s, [t for t in leaves if t is not None])]

    ref = [t.clone().float().requires_grad_(True) if t is not None else None for t in xs]
    rq, rk, rv, rb, rg, rh0 = ref
    assert rq is not None and rk is not None and rv is not None and rb is not None
    ro, rs = delta_recurrence(l2norm(rq), l2norm(rk), rv, rb, rg, 0.3, rh0)
    want = [ro.detach(), rs.detach(), *loss_grads(ro, rs, [t for t in ref if t is not None])]
    got = run(True)
    names = ["out", "state"] + [
        nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None
    ]
    if dtype == "fp32":
        for name, a, b in zip(names, got, want, strict=True):
            _close(name, a, b, 2e-5 if name in ("out", "state") else 1e-4)
        return
    old = run(False)
    for name, a, b, c in zip(names, got, want, old, strict=True):
        err, base = float((a - b).abs().max()), float((c - b).abs().max())
        peak = float(b.abs().max())
        f = 2 if name in ("out", "state") else 3
        assert err <= f * base + 2**-9 * peak, f"{name}: error {err:.3e}, the old path's {base:.3e}"


def test_fused_qk_l2norm_keeps_no_extra_copies_and_matches_the_old_path() -> None:
    """The fused path saves for the backward the normalised rows in place of the raw q, k (plus two
    (B, H, N) float32 reciprocal norms): what autograd keeps is what the op without normalisation keeps
    plus those, less than the old PyTorch path (which kept float32 copies); both paths agree."""
    op = _op()
    n = 20
    q, k, v, g, h0 = _inputs(n, 8, 8, 1.0, h=2, seed=4)
    beta = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(5)).to(DEV)
    assert g is not None
    g1 = g[..., :1].clone()
    xs = [t.to(torch.bfloat16) for t in (q, k, v)]

    def saved_bytes(l2: bool, fused: bool) -> tuple[int, Tensor, list[Tensor]]:
        leaves = [t.clone().requires_grad_(True) for t in xs]
        sizes: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            sizes[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o, s = op.delta_chunk(*leaves, beta, g1, 0.3, h0, 16, qk_l2norm=l2, fused_l2norm=fused)
        grads = list(torch.autograd.grad(o.float().sum() + s.sum(), leaves))
        return sum(sizes.values()), o, grads

    plain, _, _ = saved_bytes(False, False)
    fused, o_f, g_f = saved_bytes(True, True)
    old, o_o, g_o = saved_bytes(True, False)
    assert fused == plain + 2 * (1 * 2 * n * 4), (fused, plain)
    assert fused < old, (fused, old)
    _close("out", o_f.float(), o_o.float(), 2e-2)
    for name, a, b in zip(("dq", "dk", "dv"), g_f, g_o, strict=True):
        _close(name, a.float(), b.float(), 3e-2)


def test_the_fused_l2norm_op_passes_opcheck() -> None:
    """attnlab::delta_chunk_fwd with qk_l2norm=True: schema, fake tensors (its extra saved outputs),
    autograd registration (gradients of the raw q, k) and AOT dispatch; and attnlab::linear_step with its
    in-kernel range check (the counts written to the mutated input ``bad``)."""
    op = _op()
    q, k, v, g, h0 = _inputs(5, 8, 8, 1.0, h=1, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    beta = torch.rand(1, 1, 5).to(DEV).requires_grad_(True)
    assert g is not None
    gate = g[..., :1].clone().requires_grad_(True)  # (per channel: the fused tests' gradients cover it)
    args = (*leaves, beta, gate, h0.clone().requires_grad_(True), 0.3, 16, True, None)
    torch.library.opcheck(op.delta_chunk_fwd, (*args, True))
    # the step kernel with its range check writing the declared mutated input ``bad``
    bad = torch.full((op.step_programs(q, v),), -1, dtype=torch.int32, device=DEV)  # (all overwritten)
    torch.library.opcheck(op.linear_step_op, (q, k, v, g[..., 0], beta.detach(), h0, 0.3, True, bad))
    op.linear_step(q, k, v, g[..., 0], beta.detach(), h0, 0.3, True, bad)  # (opcheck ran on copies)
    assert bad.tolist() == [0] * bad.numel()  # every program wrote its count: none out of range
    g_bad = g[..., 0].clone()
    g_bad[0, 0, 2] = float("nan")
    op.linear_step(q, k, v, g_bad, beta.detach(), h0, 0.3, True, bad)
    assert sum(bad.tolist()) == 1


@pytest.mark.parametrize(("n", "chunk"), [(63, 16)], ids=["n63"])
def test_gla_split_backward_matches_the_recurrence(
    n: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GLA_BWD_SPLIT``: the state terms of the per-channel-gate backward by a per-chunk kernel
    (``gla_bwd_inter_kernel``), the intra-chunk terms by ``gla_bwd_sub_kernel`` on top: every gradient
    against the recurrence, as the one-kernel backward."""
    op = _op()
    monkeypatch.setattr(op, "GLA_BWD_FUSED", False)  # (the previous backward, which the split belongs to)
    monkeypatch.setattr(op, "GLA_BWD_SPLIT", True)
    launched: list[int] = []
    real = op.gla_bwd_inter_kernel

    class Counted:
        def __getitem__(self, grid: object) -> object:
            launched.append(1)
            return real[grid]

    monkeypatch.setattr(op, "gla_bwd_inter_kernel", Counted())
    _compare_with_recurrence(_inputs(n, 16, 8, 1.0), chunk)
    assert launched == [1]


def _ut_reference(k: Tensor, beta: Tensor, g: Tensor | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(A_kk, T = (I + A_kk)^-1, W = T (beta k exp(G))) per chunk in float64, (B, H, chunks, C, C|K):
    A_kk strict lower, beta_i sum_d k_id k_jd exp(G_id - G_jd), G the chunk-local cumsum of g (None, one
    per token (B, H, N, 1), or per channel), the sequence zero-padded to whole chunks."""
    b, h, n, dk = k.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n
    kk = F.pad(k.double(), (0, 0, 0, pad)).view(b, h, nc, chunk, dk)
    bb = F.pad(beta.double().expand(b, h, n), (0, pad)).view(b, h, nc, chunk)
    gg = torch.zeros(b, h, n, 1, dtype=torch.float64) if g is None else g.double().expand(b, h, n, -1)
    gc = F.pad(gg, (0, 0, 0, pad)).view(b, h, nc, chunk, -1).cumsum(3)
    lower = torch.ones(chunk, chunk, dtype=torch.bool).tril(-1)
    diff = torch.where(lower[..., None], gc[..., :, None, :] - gc[..., None, :, :], float("-inf"))
    a = bb[..., None] * (kk[..., :, None, :] * kk[..., None, :, :] * diff.exp()).sum(-1)
    t = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + a)
    w = t @ (kk * gc.exp() * bb[..., None])
    return a, t, w


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize(
    "case", ["head", "channel", "deltanet", "head-strong", "channel-strong", "beta01", "same-keys"]
)
def test_blockwise_ut_inverse_is_the_inverse(chunk: int, case: str) -> None:
    """``delta_wy_block_kernel`` (``WY_BLOCKWISE``): the saved T satisfies T (I + A_kk) = I per chunk and
    equals the float64 inverse, and W = T (beta k exp(G)), at odd lengths (a partial last chunk), under
    strong decays (e^-30 per token on every other token / half the channels), beta in {0, 1}, and
    identical keys (the substitution cancels exactly); and the row-by-row kernel agrees."""
    op = _op()
    n, dk, dv = 100, 24, 8
    q, k, v, g, _ = _inputs(n, dk, dv, 1.0, h=2, seed=11)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(3)).to(DEV)
    assert g is not None
    gate: Tensor | None = g[..., :1].clone() if case.startswith("head") or case == "same-keys" else g
    if case == "deltanet":
        gate = None
    elif case == "head-strong":
        gate = torch.where(torch.arange(n).to(DEV)[:, None] % 2 == 0, -30.0, g[..., :1])
    elif case == "channel-strong":
        gate = torch.where(torch.arange(dk).to(DEV) % 2 == 0, -30.0, g)
    elif case == "beta01":
        beta = (beta > 0.5).to(beta.dtype)
        beta[..., :5] = 1.0
    elif case == "same-keys":  # A_kk's rows all alike: large cancelling terms in the substitution
        k = k[:, :, :1].expand_as(k).contiguous()
        beta = torch.ones_like(beta)
    results = {}
    for blockwise in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(op, "WY_BLOCKWISE", blockwise)
            out = op.delta_fwd_launch(q, k, v, beta, gate, None, 0.3, chunk, True)
        results[blockwise] = out
    _, _, _, w, _, t, *_ = results[True]
    a_ref, t_ref, w_ref = (
        x.to(DEV) for x in _ut_reference(k.cpu(), beta.cpu(), None if gate is None else gate.cpu(), chunk)
    )
    b, h, nc = 1, 2, -(-n // chunk)
    t_c = t.double().view(b, h, nc, chunk, chunk)
    w_c = w.double().view(b, h, nc, chunk, dk)
    eye = torch.eye(chunk, dtype=torch.float64, device=DEV)
    assert torch.equal(t_c.triu(1), torch.zeros_like(t_c)), "T is not lower triangular"
    resid = float((t_c @ (eye + a_ref) - eye).abs().max())
    scale = float(t_ref.abs().max()) * float((eye + a_ref).abs().max())
    assert resid <= 1e-5 * max(1.0, scale), f"|T (I + A) - I| = {resid:.3e} (|T| |I + A| {scale:.3e})"
    _close("T", t_c, t_ref, 1e-5 * max(1.0, float(t_ref.abs().max())))
    _close("W", w_c, w_ref, 1e-5 * max(1.0, float(w_ref.abs().max())))
    for name, a, c in zip(
        ("o", "state", "hs", "w", "u", "t"), results[True][:6], results[False][:6], strict=True
    ):
        _close(f"{name} (blockwise vs row by row)", a, c, 2e-5 * max(1.0, float(c.abs().max())))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("n", "chunk"), [(1, 16), (63, 16), (100, 64), (500, 32)])
def test_gate_cumsum_kernel_is_the_chunk_local_cumsum(n: int, chunk: int, dtype: str) -> None:
    """``gate_cumsum`` (one launch, g in its own dtype): the PyTorch chunk-local cumsum of the float32 g,
    zero-padded to whole chunks, one gate per token and per channel."""
    op = _op()
    gen = torch.Generator().manual_seed(2)
    g = F.logsigmoid(torch.randn(2, 3, n, 24, generator=gen)).to(getattr(torch, dtype)).to(DEV)
    got = op.gate_cumsum(g, chunk)
    want = op.chunk_cumsum(g.float(), 2, 3, n, 24, chunk, g.device)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got1 = op.gate_cumsum(g[..., 0], chunk)
    want1 = op.chunk_cumsum_scalar(g[..., 0].float(), 2, 3, n, chunk, g.device)
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_the_previous_delta_forward_still_matches_the_recurrence(
    gate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WY_BLOCKWISE`` and ``DELTA_FUSED_GLUE`` off (the A/B switch back to the row-by-row UT kernel and
    PyTorch's gate cumsum and beta copy): output, state and every gradient against the recurrence."""
    op = _op()
    monkeypatch.setattr(op, "WY_BLOCKWISE", False)
    monkeypatch.setattr(op, "DELTA_FUSED_GLUE", False)
    n = 70
    q, k, v, g, h0 = _inputs(n, 8, 8, 1.0, h=1, seed=6)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 1, n, generator=torch.Generator().manual_seed(5)).to(DEV)
    assert g is not None
    xs: list[Tensor | None] = [q, k, v, beta, g[..., :1].clone() if gate == "head" else g, h0]
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], 64)
    ro, rs = delta_recurrence(*ref[:5], 0.3, ref[5])  # type: ignore[arg-type]
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, rs, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(o.sum() + s.sum(), [t for t in leaves if t is not None])
    want = torch.autograd.grad(ro.sum() + rs.sum(), [t for t in ref if t is not None])
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), got, want, strict=True):
        _close(name, a, b, 1e-4)


@pytest.mark.parametrize(
    ("n", "chunk", "dk", "dv", "gate", "h0", "varlen"),
    [(70, 16, 8, 8, "head", True, False), (63, 32, 72, 24, "channel", True, False),
     (40, 16, 130, 16, "head", False, False), (33, 16, 16, 40, "channel", False, False),
     (50, 16, 8, 8, "none", True, False), (61, 16, 8, 8, "head", True, True),
     (61, 16, 8, 8, "channel", True, True)],
    ids=["head-h0", "channel-k72-two-tiles", "head-k130-three-tiles", "channel-v40-two-value-blocks",
         "deltanet", "varlen-head", "varlen-channel"],
)  # fmt: skip
def test_delta_h_v2_matches_the_previous_sequential_pass(
    n: int, chunk: int, dk: int, dv: int, gate: str, h0: bool, varlen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DELTA_H_V2`` (the state as 64-row tiles, k^T loaded transposed) against ``delta_h_kernel``: output,
    final state and the saved chunk-start states, W, U, T, at lengths off the chunk grid, several state
    tiles and value blocks, with and without an initial state, packed sequences; and without ``save`` (the
    compact states and U) the same output and final state. (H_kv < H reaches the kernels as repeated k.)"""
    op = _op()
    monkeypatch.setattr(op, "DELTA_H_BV", 16)  # several value blocks at these small dims
    h = 3
    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, h, n, dk, generator=gen) for _ in range(2))
    k = F.normalize(k.repeat_interleave(3, dim=1)[:, :h], dim=-1)  # a key head shared by query heads
    v = torch.randn(1, h, n, dv, generator=gen)
    beta = torch.rand(1, h, n, generator=gen)
    g: Tensor | None = F.logsigmoid(torch.randn(1, h, n, dk if gate == "channel" else 1, generator=gen) + 1)
    if gate == "none":
        g = None
    seq = torch.tensor([0, 2, 3, 4]) if varlen else None
    n_seq = 3 if varlen else 1
    s0 = torch.randn(n_seq, h, dk, dv, generator=gen) if h0 else None
    args = [None if t is None else t.to(DEV) for t in (q, k, v, beta, g, s0)]
    seq_d = None if seq is None else seq.to(DEV)
    for save in (True, False):
        outs = {}
        for v2 in (False, True):
            monkeypatch.setattr(op, "DELTA_H_V2", v2)
            outs[v2] = op.delta_fwd_launch(*args, 0.3, chunk, save, seq_d)  # type: ignore[arg-type]
        names = ("o", "state", "hs", "w", "u", "t") if save else ("o", "state")
        for name, a, b in zip(names, outs[True], outs[False], strict=False):
            _close(f"{name} (save={save})", a, b, 2e-5)


def test_delta_h_v2_compact_bfloat16_forward_matches_the_previous_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without gradients in bfloat16 the new pass hands the output kernel its states and U in bfloat16
    (``DELTA_H_COMPACT``): the output within bfloat16 rounding of the float32 path's. The final state: as
    exact in the interpreter (fp32 dot operands there); on a GPU the new pass multiplies bf16 operands
    (``DELTA_H_LOWP``, as fla does) where the previous one used tf32, so there both are judged against the
    fp32 recurrence by the 2x rule (the bf16 recurrence's own error as the yardstick)."""
    op = _op()
    q, k, v, g, h0 = _inputs(70, 16, 16, 1.0, h=2, seed=4)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 2, 70, generator=torch.Generator().manual_seed(5)).to(DEV)
    assert g is not None
    xs = [t.to(torch.bfloat16) for t in (q, k, v)]
    outs = {}
    for v2 in (False, True):
        monkeypatch.setattr(op, "DELTA_H_V2", v2)
        outs[v2] = op.delta_fwd_launch(*xs, beta, g[..., :1].clone(), h0, 0.3, 16, False)
    assert outs[True][0].dtype == torch.bfloat16
    _close("o", outs[True][0].float(), outs[False][0].float(), 2e-2)
    if DEV.type != "cuda":
        _close("state", outs[True][1], outs[False][1], 1e-4)
        return
    gg = g[..., :1].expand_as(g)
    want = delta_recurrence(*(t.float() for t in xs), beta, gg, 0.3, h0)[1]
    low = delta_recurrence(*xs, beta.to(torch.bfloat16), gg.to(torch.bfloat16), 0.3,
                           h0.to(torch.bfloat16))[1].float()  # fmt: skip
    bound = 2 * (low - want).abs().max() + 1e-5 * (1 + want.abs().max())
    for v2 in (False, True):
        err = (outs[v2][1] - want).abs().max()
        assert err <= bound, (v2, float(err), float(bound))
