"""The gated linear (gla) forward's A/B switches in ``attnlab.kernels.linear.op`` (issue 9):
``GLA_FUSED_GLUE`` (the gate cumsum and its backward by Triton launches inside the op), ``GLA_H_PASS`` (the
chunk states by one sequential pass), ``GLA_H_COMPACT`` (those states in 16 bits without a backward) and
``GLA_INTRA_V2`` (the intra-chunk scores by log2(chunk) split dots). Against the fp32 token recurrence:
output, final state and every gradient (q, k, v, g, the initial state), with every switch on (the
default), each one off, each one alone, and all off; odd lengths, several key / value tiles, decays near 0
and near 1, gates shared by the channels, packed sequences, bf16 inputs (the accuracy rule); which kernels
each setting launches; the new kernels' own results. Tiny shapes (Triton's interpreter on a CPU machine),
and one CUDA test at 1x32x8192."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import gated_recurrence
from attnlab.testing import KernelLaunches, device_under_test

DEV = device_under_test()
FLAGS = ("GLA_FUSED_GLUE", "GLA_H_PASS", "GLA_H_COMPACT", "GLA_INTRA_V2")
#: Flag settings by name: every flag on (the default), each one off, each one alone, all off.
SETTINGS: dict[str, dict[str, bool]] = {
    "defaults": dict.fromkeys(FLAGS, True),
    **{f"{f}-off": {g: g != f for g in FLAGS} for f in FLAGS},
    **{f"{f}-only": {g: g == f for g in FLAGS} for f in FLAGS},
    "all-off": dict.fromkeys(FLAGS, False),
}


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


@pytest.fixture
def setting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The op module's flags as named by the test's ``setting`` parameter."""
    op = _op()
    for flag, on in SETTINGS[request.param].items():
        monkeypatch.setattr(op, flag, on)
    yield request.param


def _inputs(
    n: int, dk: int, dv: int, gates: str, *, h: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v and the log-decays g of ``gates``: "channel" (logsigmoid, mostly 0.5..1), "near-zero"
    (decays ~ e^-30 per token: exp(-G) over a chunk would overflow), "near-one" (1 - 1e-6), "mixed" (e^-30
    on half the channels, the rest as "channel"), "head" (one per token and head: (B, H, N, 1)), "none"."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, h, n, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, h, n, dv, generator=gen)
    g: Tensor | None = F.logsigmoid(torch.randn(1, h, n, dk, generator=gen) + 1.0)
    assert g is not None
    if gates == "near-zero":
        g = -30.0 - torch.rand(1, h, n, dk, generator=gen)
    elif gates == "near-one":
        g = torch.full_like(g, -1e-6)
    elif gates == "mixed":
        g = torch.where(torch.arange(dk) % 2 == 0, -30.0, g)
    elif gates == "head":
        g = g[..., :1].clone()
    elif gates == "none":
        g = None
    return q.to(DEV), k.to(DEV), v.to(DEV), None if g is None else g.to(DEV)


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _grads(o: Tensor, s: Tensor, wrt: list[Tensor], seed: int = 7) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(DEV)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    return [x.float() for x in torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), wrt)]


def _check_against_the_recurrence(xs: list[Tensor | None], chunk: int, tol: float = 2e-5) -> None:
    """gla_chunk on xs = (q, k, v, g, h0) in float32 against the token recurrence: output and state within
    ``tol``, every gradient within 5 ``tol`` (test_linear_kernels' rule for gla)."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    q, k, v, g, h0 = leaves
    assert q is not None and k is not None and v is not None
    o, s = _op().gla_chunk(q, k, v, g, 0.3, h0, chunk)
    rq, rk, rv, rg, rh0 = ref
    assert rq is not None and rk is not None and rv is not None
    ro, rs = gated_recurrence(rq, rk, rv, rg, 0.3, rh0)
    assert o.dtype == q.dtype and s.dtype == torch.float32
    _close("o", o, ro, tol)
    _close("state", s, rs, tol)
    got = _grads(o, s, [t for t in leaves if t is not None])
    want = _grads(ro, rs, [t for t in ref if t is not None])
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        _close(name, a, b, 5 * tol)


#: (n, chunk, K, V, gates, initial state) by id.
CASES = {
    "n1": (1, 16, 8, 12, "channel", True),
    "n63": (63, 16, 8, 12, "channel", True),
    "n100-chunk32": (100, 32, 8, 12, "channel", True),
    "n70-chunk64-k72-v40": (70, 64, 72, 40, "channel", True),
    "near-zero-decay": (40, 16, 8, 8, "near-zero", True),
    "near-one-decay": (40, 16, 8, 8, "near-one", True),
    "half-channels-near-zero": (45, 16, 8, 8, "mixed", False),
    "head-gate": (50, 16, 8, 8, "head", True),
    "no-gate": (33, 32, 8, 8, "none", False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "setting", ["defaults"], indirect=True
)  # (all-off: the cases below and test_linear_kernels' older ones)
def test_every_case_matches_the_recurrence(setting: str, case: str) -> None:
    """Output, final state and the gradients of q, k, v, g and h0, with every switch on and all off: odd
    lengths (1, 63, 100, a partial last chunk), every chunk size, two key tiles and two value tiles of
    the state pass (K = 72, V = 40), decays near 0 (e^-30 per token, on every channel or half of them)
    and near 1, a gate per token and head (the scalar-gate kernels), no gate."""
    n, chunk, dk, dv, gates, h0 = CASES[case]
    q, k, v, g = _inputs(n, dk, dv, gates)
    s0 = torch.randn(1, 2, dk, dv, generator=torch.Generator().manual_seed(1)).to(DEV) if h0 else None
    _check_against_the_recurrence([q, k, v, g, s0], chunk, tol=4e-5 if dk > 8 else 2e-5)


@pytest.mark.parametrize("case", ["n63", "near-zero-decay"])
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s not in ("defaults", "all-off")], indirect=True)
def test_each_switch_alone_and_each_one_off_match_the_recurrence(setting: str, case: str) -> None:
    n, chunk, dk, dv, gates, h0 = CASES[case]
    q, k, v, g = _inputs(n, dk, dv, gates, seed=2)
    s0 = torch.randn(1, 2, dk, dv, generator=torch.Generator().manual_seed(3)).to(DEV) if h0 else None
    _check_against_the_recurrence([q, k, v, g, s0], chunk)


def _rule(name: str, got: Tensor, ref: Tensor, low: Tensor, factor: float) -> None:
    """The accuracy rule of the GPU checks (``benchmarks/linear_gpu_check.py``): the error against the fp32
    recurrence at most ``factor`` times that of the recurrence run in bfloat16, plus 1e-5 relative and
    half a bfloat16 ulp of the peak."""
    err, err_low = (float((x.detach().float() - ref).abs().max()) for x in (got, low))
    peak = float(ref.abs().max())
    bound = factor * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(torch.bfloat16).eps * peak
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (bf16 recurrence's {err_low:.3e})"


@pytest.mark.parametrize("setting", list(SETTINGS), indirect=True)
def test_bfloat16_forward_without_gradients_meets_the_accuracy_rule(setting: str) -> None:
    """bf16 q, k, v, no gradients (the path that keeps its chunk states in bf16 with ``GLA_H_COMPACT``):
    output and final state within 2x the bf16 recurrence's error (plus half an ulp of the peak)."""
    q, k, v, g = _inputs(70, 16, 16, "channel", seed=4)
    assert g is not None
    h0 = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    with torch.no_grad():
        o, s = _op().gla_chunk(qb, kb, vb, g, 0.25, h0, 16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rs = gated_recurrence(qb.float(), kb.float(), vb.float(), g, 0.25, h0)
    lo, ls = gated_recurrence(qb, kb, vb, g, 0.25, h0)
    _rule("o", o, ro, lo, 2.0)
    _rule("state", s, rs, ls, 2.0)


@pytest.mark.parametrize("setting", ["defaults", "all-off"], indirect=True)
def test_bfloat16_inputs_and_gate_with_gradients_meet_the_accuracy_rule(setting: str) -> None:
    """bf16 q, k, v and g (the fused glue reads g in bf16 and returns dg in bf16) with every gradient: the
    2x rule for output and state, 3x for the gradients (``linear_gpu_check``'s)."""
    q, k, v, g = _inputs(50, 16, 16, "channel", seed=6)
    assert g is not None
    h0 = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    xs = [q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), g.to(torch.bfloat16), h0]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    o, s = _op().gla_chunk(*leaves[:4], 0.25, leaves[4], 16)
    dg = torch.autograd.grad(o.float().sum(), leaves[3], retain_graph=True)[0]
    assert dg.dtype == torch.bfloat16 and dg.shape == g.shape
    got = [o.float(), s, *_grads(o, s, leaves)]
    ref = [t.float().clone().requires_grad_(True) for t in xs]
    ro, rs = gated_recurrence(ref[0], ref[1], ref[2], ref[3], 0.25, ref[4])
    want = [ro.detach(), rs.detach(), *_grads(ro, rs, ref)]
    low_leaves = [t.clone().requires_grad_(True) for t in xs]
    lq, lk, lv, lg, lh0 = low_leaves
    lo, ls = gated_recurrence(lq, lk, lv, lg, 0.25, lh0.to(torch.bfloat16))
    low = [lo.float(), ls.float(), *_grads(lo, ls.float(), low_leaves)]
    for name, a, b, c in zip(("o", "state", "dq", "dk", "dv", "dg", "dh0"), got, want, low, strict=True):
        _rule(name, a, b, c, 2.0 if name in ("o", "state") else 3.0)


@pytest.mark.parametrize("gates", ["channel", "head"])
@pytest.mark.parametrize("setting", ["defaults", "all-off"], indirect=True)
def test_packed_sequences_run_each_sequence_alone(setting: str, gates: str) -> None:
    """``gla_chunk_varlen`` (an empty sequence, one shorter than a chunk, one over two chunk boundaries),
    each sequence from its own initial state: output, final states and every gradient equal the recurrence
    run on each sequence alone."""
    cu = [0, 5, 5, 40, 61]
    q, k, v, g = _inputs(61, 8, 8, gates, seed=3)
    assert g is not None
    h0 = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(4)).to(DEV)
    xs = [q, k, v, g, h0]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    ref = [t.clone().requires_grad_(True) for t in xs]
    o, s = _op().gla_chunk_varlen(*leaves[:4], 0.3, leaves[4], 16, torch.tensor(cu).to(DEV))
    outs, states = [], []
    for i, (t0, t1) in enumerate(itertools.pairwise(cu)):
        if t0 == t1:  # an empty sequence keeps its initial state
            states.append(ref[4][i : i + 1])
            continue
        rq, rk, rv, rg = (t[:, :, t0:t1] for t in ref[:4])
        oi, si = gated_recurrence(rq, rk, rv, rg, 0.3, ref[4][i : i + 1])
        outs.append(oi)
        states.append(si)
    ro, rs = torch.cat(outs, 2), torch.cat(states, 0)
    _close("o", o, ro, 2e-5)
    _close("state", s, rs, 2e-5)
    for name, a, b in zip(
        ("dq", "dk", "dv", "dg", "dh0"), _grads(o, s, leaves), _grads(ro, rs, ref), strict=True
    ):
        _close(name, a, b, 1e-4)


KERNELS = [
    "gate_cumsum_kernel", "gate_cumsum_bwd_kernel", "gla_h_kernel", "chunk_local_state_kernel",
    "chunk_scan_kernel", "intra_scores_kernel", "intra_scores_v2_kernel", "chunk_out_kernel",
]  # fmt: skip


@pytest.mark.parametrize("setting", ["defaults", "all-off"], indirect=True)
def test_the_forward_launches_what_its_switches_say(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-channel gates, no gradients: with the defaults four launches (gate cumsum, state pass, scores,
    output) and no PyTorch cumsum; all off: the previous forward's (PyTorch cumsum, local states, scan,
    scores by sub-block, output). With gradients the backward's dg takes one more launch (defaults) in the
    previous backward (``GLA_BWD_FUSED`` off here; the fused one folds it in: test_linear_gla_backward)."""
    op = _op()
    monkeypatch.setattr(op, "GLA_BWD_FUSED", False)
    launches = KernelLaunches(monkeypatch, _op(), KERNELS)
    cumsums: list[int] = []
    real = op.chunk_cumsum

    def counted(*a: object) -> Tensor:
        cumsums.append(1)
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(op, "chunk_cumsum", counted)
    q, k, v, g = _inputs(40, 8, 8, "channel")
    with torch.no_grad():
        op.gla_chunk(q, k, v, g, 0.3, None, 16)
    if setting == "defaults":
        assert launches.seen == [
            "gate_cumsum_kernel",
            "gla_h_kernel",
            "intra_scores_v2_kernel",
            "chunk_out_kernel",
        ]
        assert cumsums == []
    else:
        assert launches.seen == [
            "chunk_local_state_kernel", "chunk_scan_kernel", "intra_scores_kernel", "chunk_out_kernel"
        ]  # fmt: skip
        assert cumsums == [1]
    launches.seen.clear()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]  # type: ignore[union-attr]
    o, s = op.gla_chunk(*leaves, 0.3, None, 16)
    (o.sum() + s.sum()).backward()
    assert ("gate_cumsum_bwd_kernel" in launches.seen) == (setting == "defaults")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("save", [True, False])
def test_the_state_pass_keeps_float32_states_for_the_backward(
    save: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gla_h``: the chunk-start states in bf16 only without a backward (``save`` False) for bf16 inputs,
    float32 otherwise (the backward reads them), equal to stages 1 and 2's (``chunk_states``) within the
    rounding to bf16; the final state float32 and equal; per-channel gates and one per token, with packed
    sequences (each sequence's own initial state), two key tiles and two value tiles."""
    op = _op()
    monkeypatch.setattr(op, "GLA_H_BK", 32)  # two key tiles at K = 40
    monkeypatch.setattr(op, "GLA_H_BV", 16)  # two value tiles at V = 24
    q, k, v, g = _inputs(70, 40, 24, "channel", h=3, seed=8)
    assert g is not None
    k, v = k.to(dtype), v.to(dtype)
    seq = torch.tensor([0, 2, 3, 5], dtype=torch.int32).to(DEV)
    h0 = torch.randn(3, 3, 40, 24, generator=torch.Generator().manual_seed(9)).to(DEV)
    for gc, seq_chunks, s0 in (
        (op.chunk_cumsum(g, 1, 3, 70, 40, 16, q.device), None, h0[:1]),
        (op.chunk_cumsum_scalar(g[..., 0], 1, 3, 70, 16, q.device), None, None),
        (op.chunk_cumsum(g, 1, 3, 70, 40, 16, q.device), seq, h0),
    ):
        hs, ht = op.gla_h(k, v, gc, s0, 16, save, seq_chunks)
        want_hs, want_ht, _ = op.chunk_states(k, v, gc, s0, 1.0, 16, False, seq_chunks=seq_chunks)
        low = dtype == torch.bfloat16 and not save
        assert hs.dtype == (torch.bfloat16 if low else torch.float32) and ht.dtype == torch.float32
        _close("hs", hs.float(), want_hs.to(hs.dtype).float() if low else want_hs, 1e-2 if low else 2e-5)
        _close("ht", ht, want_ht, 2e-5)


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("gates", ["channel", "near-zero", "mixed", "near-one"])
def test_split_intra_chunk_scores_are_exact(chunk: int, gates: str) -> None:
    """``intra_scores_v2_kernel`` (``GLA_INTRA_V2``) against the float64 scores sum_d q_td k_jd
    exp(G_td - G_jd) (j <= t in t's chunk) and the sub-block kernel's: every chunk size, a partial last
    chunk, decays e^-30 per token (every channel, half of them: finite, no NaN), decays near 1; the upper
    triangle exactly 0."""
    op = _op()
    n, dk = 100, 24
    q, k, _, g = _inputs(n, dk, 8, gates, seed=10)
    assert g is not None
    gc = op.chunk_cumsum(g, 1, 2, n, dk, chunk, q.device)
    got = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=True)
    old = op.intra_scores(q, k, gc, None, chunk, strict=False)
    nc = gc.shape[2] // chunk
    qp, kp = (F.pad(t.double(), (0, 0, 0, nc * chunk - n)).view(1, 2, nc, chunk, dk) for t in (q, k))
    gcc = gc.double().view(1, 2, nc, chunk, dk)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(lower[..., None], gcc[..., :, None, :] - gcc[..., None, :, :], float("-inf"))
    want = (qp[..., :, None, :] * kp[..., None, :, :] * diff.exp()).sum(-1).view(1, 2, nc * chunk, chunk)
    assert torch.isfinite(got).all()
    upper = ~lower.repeat(nc, 1)
    assert torch.equal(got[..., upper], torch.zeros_like(got[..., upper]))
    _close("scores", got.double(), want, 1e-5)
    _close("scores (v2 vs sub-block kernel)", got, old, 1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "chunk"), [(1, 16), (63, 16), (100, 64)])
def test_gate_cumsum_backward_is_the_reverse_cumsum_plus_the_chunk_end_term(
    n: int, chunk: int, out_dtype: torch.dtype
) -> None:
    """``gate_cumsum_bwd_kernel``: dg_t = sum of dG over the rows s >= t of t's chunk, plus the chunk-end
    term of t's chunk, cut to N rows, in g's dtype."""
    op = _op()
    gen = torch.Generator().manual_seed(11)
    nc = -(-n // chunk)
    dgc = torch.randn(2, 3, nc * chunk, 24, generator=gen).to(DEV)
    tail = torch.randn(2, 3, nc, 24, generator=gen).to(DEV)
    dg = torch.empty(2, 3, n, 24, dtype=out_dtype, device=DEV)
    op.gate_cumsum_bwd_kernel[(nc, 6, 1)](dgc, tail, dg, n, nc * chunk, 24, BT=chunk, BD=32)
    want = dgc.view(2, 3, nc, chunk, 24).flip(3).cumsum(3).flip(3) + tail[:, :, :, None]
    want = want.reshape(2, 3, nc * chunk, 24)[:, :, :n].to(out_dtype)
    _close("dg", dg.float(), want.float(), 1e-5 if out_dtype == torch.float32 else 1e-2)


def test_the_op_with_the_raw_gate_passes_opcheck() -> None:
    """attnlab::gla_chunk_fwd with ``raw_gate`` (g itself, its cumsum made in the op and saved): schema,
    fake tensors (the extra saved output), autograd (the gradient of g, in g's dtype) and AOT dispatch."""
    op = _op()
    q, k, v, g = _inputs(5, 8, 8, "channel", h=1)
    h0 = torch.randn(1, 1, 8, 8).to(DEV).requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]  # type: ignore[union-attr]
    torch.library.opcheck(op.gla_chunk_fwd, (*leaves, h0, 0.3, 16, True, None, True))
    plain = [t.detach() for t in leaves]  # (no backward without save)
    torch.library.opcheck(op.gla_chunk_fwd, (*plain, h0.detach(), 0.3, 16, False, None, True))


@pytest.mark.cuda
def test_full_size_bfloat16_forward_meets_the_accuracy_rule_on_cuda() -> None:
    """1x32x8192, D = 128, bf16 q, k, v (gla's benchmark shape and gates: ``linear_gpu_check.make_case``'s
    logsigmoid(x + 3) / 4, bf16-representable), an initial state, the default switches: output and final
    state against the fp32 token recurrence by the GPU checks' rule (2x the bf16 recurrence's error plus
    1e-5 relative and half an ulp of the peak), without gradients (chunk states in bf16) and with them
    (float32 states kept for the backward)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, d = 1, 32, 8192, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    h0 = torch.randn(b, h, d, d, device="cuda", generator=gen)
    g = (F.logsigmoid(torch.randn(b, h, n, d, device="cuda", generator=gen) + 3.0) / 4).to(torch.bfloat16)
    g = g.float()
    scale = d**-0.5
    with torch.no_grad():
        ro, rs = gated_recurrence(q.float(), k.float(), v.float(), g, scale, h0)
        lo, ls = gated_recurrence(q, k, v, g, scale, h0)
        o, s = _op().gla_chunk(q, k, v, g, scale, h0, 64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    _rule("o (no grad)", o, ro, lo, 2.0)
    _rule("state (no grad)", s, rs, ls, 2.0)
    qg = q.clone().requires_grad_(True)
    o, s = _op().gla_chunk(qg, k, v, g, scale, h0, 64)
    _rule("o (grad)", o.detach(), ro, lo, 2.0)
    _rule("state (grad)", s.detach(), rs, ls, 2.0)
