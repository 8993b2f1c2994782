"""The gated delta rule under per-channel gates (KDA) with the forward's two intra-chunk score matrices kept
for the backward (``attnlab.kernels.linear.op.DELTA_SAVE_SCORES``): the forward makes the strict k k^T
scores without beta (B) and the UT-transform kernel applies beta itself (``AKK_BETA`` False), the op
saves the q k^T scores and B, and the backward takes them instead of recomputing them. Against the switch
off and the token recurrence (output, final state, every gradient), with padded rows, zeros in beta, the
fused L2 norm and packed sequences; the number of score launches; the scalar-gate and no-gate paths
unchanged; the custom ops' opcheck both ways. Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence
from attnlab.testing import device_under_test

DEV = device_under_test()
#: The switch on against off: the same products (B's rows times beta in the UT kernel, as intra_scores
#: makes A_kk), so bit for bit in Triton's interpreter; on a GPU the compiler may contract the product
#: with a later add differently (an FMA), so within 1e-5 there.
SAME = 0.0 if DEV.type == "cpu" else 1e-5


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    if tol == 0.0:  # (exact)
        assert torch.equal(got, want), f"{name}: max |difference| {float((got - want).abs().max()):.3e}"
        return
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _inputs(
    n: int, gate: str = "channel", *, beta_zeros: bool = False, h: int = 1, n_seq: int = 1, seed: int = 1,
    shift: float = 1.0,
) -> list[Tensor | None]:  # fmt: skip
    """q, k (L2-normalised), v, beta, g (log-decays logsigmoid(x + shift): per channel, one per token or
    None), h0 (n_seq states) on the device under test, float32; ``beta_zeros``: every third beta exactly
    0 (and a whole 16-row block)."""
    gen = torch.Generator().manual_seed(seed)
    dk = dv = 8
    q, k = (torch.randn(1, h, n, dk, generator=gen) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(1, h, n, dv, generator=gen)
    channels = dk if gate == "channel" else 1
    g: Tensor | None = F.logsigmoid(torch.randn(1, h, n, channels, generator=gen) + shift)
    if gate == "none":
        g = None
    beta = torch.rand(1, h, n, generator=gen)
    if beta_zeros:
        beta[..., ::3] = 0.0
        beta[..., 16:32] = 0.0
    h0 = torch.randn(n_seq, h, dk, dv, generator=gen)
    return [None if t is None else t.to(DEV) for t in (q, k, v, beta, g, h0)]


def _loss_grads(
    o: Tensor, s: Tensor, leaves: list[Tensor | None], seed: int = 7
) -> tuple[Tensor, ...]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    wrt = [t for t in leaves if t is not None]
    return torch.autograd.grad((o * do).sum() + (s * ds).sum(), wrt)


def _chunk_run(
    xs: list[Tensor | None], chunk: int, save_scores: bool, mp: pytest.MonkeyPatch, qk_l2norm: bool = False,
    cu: list[int] | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """(o, final state, the gradients of q, k, v, beta, g (if any), h0) of the chunk op."""
    op = _op()
    mp.setattr(op, "DELTA_SAVE_SCORES", save_scores)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = leaves
    assert q is not None and k is not None and v is not None and beta is not None
    if cu is None:
        o, s = op.delta_chunk(q, k, v, beta, g, 0.3, h0, chunk, qk_l2norm)
    else:
        cu_t = torch.tensor(cu).to(DEV)
        o, s = op.delta_chunk_varlen(q, k, v, beta, g, 0.3, h0, chunk, cu_t, qk_l2norm)
    return (o, s, *_loss_grads(o, s, leaves))


def _reference(
    xs: list[Tensor | None], qk_l2norm: bool = False, cu: list[int] | None = None
) -> tuple[Tensor, ...]:
    """The fp32 recurrence's (o, final state, gradients), on each packed sequence alone with ``cu``."""
    from attnlab.kernels.linear.naive import l2norm

    ref = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    q, k, v, beta, g, h0 = ref
    assert q is not None and k is not None and v is not None and beta is not None and h0 is not None
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if cu is None:
        o, s = delta_recurrence(q, k, v, beta, g, 0.3, h0)
    else:
        outs, states = [], []
        for i, (a, b) in enumerate(itertools.pairwise(cu)):
            if a == b:  # an empty sequence keeps its initial state
                states.append(h0[i : i + 1])
                continue
            gi = None if g is None else g[:, :, a:b]
            oi, si = delta_recurrence(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], beta[:, :, a:b], gi, 0.3,
                                      h0[i : i + 1])  # fmt: skip
            outs.append(oi)
            states.append(si)
        o, s = torch.cat(outs, 2), torch.cat(states, 0)
    return (o, s, *_loss_grads(o, s, ref))


def _names(xs: list[Tensor | None]) -> list[str]:
    return ["o", "state"] + [
        nm for nm, t in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), xs, strict=True) if t is not None
    ]


def _check_both_ways(
    xs: list[Tensor | None], chunk: int, mp: pytest.MonkeyPatch, qk_l2norm: bool = False,
    cu: list[int] | None = None,
) -> None:  # fmt: skip
    on = _chunk_run(xs, chunk, True, mp, qk_l2norm, cu)
    off = _chunk_run(xs, chunk, False, mp, qk_l2norm, cu)
    want = _reference(xs, qk_l2norm, cu)
    names = _names(xs)
    assert len(on) == len(off) == len(want) == len(names)
    for name, a, b, c in zip(names, on, off, want, strict=True):
        _close(f"{name} (saved vs recomputed scores)", a, b, SAME)
        tol = 2e-5 if name in ("o", "state") else 1e-4
        _close(f"{name} (saved scores vs the recurrence)", a, c, tol)
        _close(f"{name} (recomputed scores vs the recurrence)", b, c, tol)


KDA_CASES = [
    (63, 16, False, False),
    (70, 32, False, False),
    (70, 64, False, False),
    (70, 32, True, False),
    (63, 16, True, False),
    (63, 16, False, True),
    (70, 32, True, True),
]
KDA_IDS = ["n63-chunk16", "n70-chunk32", "n70-chunk64", "beta-zeros-chunk32", "beta-zeros-chunk16",
           "l2norm-chunk16", "beta-zeros-l2norm-chunk32"]  # fmt: skip


@pytest.mark.parametrize(("n", "chunk", "beta_zeros", "qk_l2norm"), KDA_CASES, ids=KDA_IDS)
def test_kda_with_saved_scores_matches_the_recomputed_ones_and_the_recurrence(
    n: int, chunk: int, beta_zeros: bool, qk_l2norm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output, final state and dq, dk, dv, dbeta, dg, dh0 with the switch on and off: equal to each other
    and to the fp32 recurrence (padded last chunk; beta with exact zeros; the fused q/k L2 norm)."""
    xs = _inputs(n, beta_zeros=beta_zeros, h=2 if chunk == 32 else 1)
    _check_both_ways(xs, chunk, monkeypatch, qk_l2norm)


@pytest.mark.parametrize("qk_l2norm", [False, True], ids=["raw-qk", "l2norm"])
def test_packed_kda_with_saved_scores(qk_l2norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``delta_chunk_varlen`` (an empty sequence, one shorter than a chunk, one over two chunk boundaries)
    with the switch on and off: equal to each other and to the recurrence on each sequence alone."""
    cu = [0, 5, 5, 40, 61]
    xs = _inputs(61, h=2, n_seq=4, seed=3)
    _check_both_ways(xs, 16, monkeypatch, qk_l2norm, cu)


def _count_scores(mp: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Record each ``op.intra_scores`` call as (strict, with beta)."""
    op = _op()
    calls: list[tuple[bool, bool]] = []
    real = op.intra_scores

    def counted(x: Tensor, k: Tensor, gc: Tensor, beta: Tensor | None, chunk: int, **kw: bool) -> Tensor:
        calls.append((bool(kw["strict"]), beta is not None))
        return real(x, k, gc, beta, chunk, **kw)  # type: ignore[no-any-return]

    mp.setattr(op, "intra_scores", counted)
    return calls


@pytest.mark.parametrize("save_scores", [True, False], ids=["saved", "recomputed"])
def test_the_backward_recomputes_no_scores_with_the_switch_on(
    save_scores: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On: the forward makes the strict k k^T scores without beta and the q k^T scores (two launches),
    the backward none. Off: the forward's beta-scaled k k^T and q k^T, the backward's q k^T and k k^T."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_SAVE_SCORES", save_scores)
    calls = _count_scores(monkeypatch)
    xs = _inputs(40)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
    o, s = op.delta_chunk(*leaves[:5], 0.3, leaves[5], 16)
    if save_scores:
        assert calls == [(True, False), (False, False)]
    else:
        assert calls == [(True, True), (False, False)]
    _loss_grads(o, s, leaves)
    if save_scores:
        assert calls == [(True, False), (False, False)]
    else:
        assert calls == [(True, True), (False, False), (False, False), (True, False)]


def test_a_forward_without_gradients_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a backward (save=False) the switch changes nothing: the beta-scaled k k^T scores, nothing
    kept, the same output and state."""
    op = _op()
    xs = _inputs(40)
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(op, "DELTA_SAVE_SCORES", on)
        calls = _count_scores(monkeypatch)
        with torch.no_grad():
            res = op.delta_chunk_fwd(*xs[:5], xs[5], 0.3, 16, False)
        assert calls == [(True, True), (False, False)]
        assert all(t.numel() == 0 for t in res[2:])
        outs[on] = res[:2]
        monkeypatch.undo()
    for name, a, b in zip(("o", "state"), outs[True], outs[False], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "row-by-row"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_the_ut_transform_applies_beta_itself(
    chunk: int, blockwise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``delta_fwd_launch`` with ``save``: with the switch on the UT-transform kernel takes the unscaled
    strict scores B and applies beta (every 16-row block's own: chunk 64 has four) and gives the T, W, U
    of the switch off; the kept scores are the q k^T scores and B (B beta = the forward's A_kk)."""
    op = _op()
    monkeypatch.setattr(op, "WY_BLOCKWISE", blockwise)
    xs = _inputs(70, beta_zeros=True, h=2, seed=5, shift=4.0)  # (weak decays: far blocks' scores count)
    q, k, v, beta, g, h0 = xs
    assert q is not None and k is not None and v is not None and beta is not None and g is not None
    res = {}
    for on in (True, False):
        monkeypatch.setattr(op, "DELTA_SAVE_SCORES", on)
        res[on] = op.delta_fwd_launch(q, k, v, beta, g, h0, 0.3, chunk, True)
    assert len(res[True]) == len(res[False]) == 12
    for i, name in enumerate(("o", "state", "hs", "w", "u", "t")):
        _close(name, res[True][i], res[False][i], SAME)
    aqk, bkk = res[True][10:]
    assert all(t.numel() == 0 for t in res[False][10:])
    gc = op.chunk_cumsum(g, 1, 2, 70, 8, chunk, q.device)
    v2, wide = op.DELTA_INTRA_V2, op.DELTA_INTRA_V2_F32
    want_aqk = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=v2, f32_operands=wide)
    want_akk = op.intra_scores(k, k, gc, beta, chunk, strict=True, v2=v2, f32_operands=wide)
    np_ = gc.shape[2]
    assert aqk.shape == bkk.shape == (1, 2, np_, chunk)
    _close("aqk", aqk, want_aqk, 1e-6)
    _close("B beta", bkk * F.pad(beta, (0, np_ - 70))[..., None], want_akk, 1e-6)


@pytest.mark.parametrize("gate", ["scalar", "none"])
def test_scalar_and_no_gate_paths_ignore_the_switch(gate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gate shared by the channels (or none): no intra-chunk score launch either way, nothing extra kept,
    the same output, state and gradients (bit for bit)."""
    op = _op()
    xs = _inputs(40, gate, seed=2)
    got = {}
    for on in (True, False):
        monkeypatch.setattr(op, "DELTA_SAVE_SCORES", on)
        calls = _count_scores(monkeypatch)
        got[on] = _chunk_run(xs, 16, on, monkeypatch)
        res = op.delta_chunk_fwd(*xs[:5], xs[5], 0.3, 16, True)
        assert res[10].numel() == 0 and res[11].numel() == 0
        assert calls == []
        monkeypatch.undo()
    for name, a, b in zip(_names(xs), got[True], got[False], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("save_scores", [True, False], ids=["saved", "recomputed"])
def test_the_delta_ops_pass_opcheck(save_scores: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``attnlab::delta_chunk_fwd`` (schema, fake tensors: the kept scores' shapes follow the switch,
    autograd registration, AOT dispatch: the backward through the saved scores) per channel and per token,
    with and without the fused L2 norm; ``attnlab::delta_chunk_bwd`` with the kept scores and without."""
    op = _op()
    monkeypatch.setattr(op, "DELTA_SAVE_SCORES", save_scores)
    xs = _inputs(21, h=2, seed=4)
    q, k, v, beta, g, h0 = (None if t is None else t.clone().requires_grad_(True) for t in xs)
    assert g is not None
    g1 = g[..., :1].detach().clone().requires_grad_(True)
    for gate, l2 in ((g, False), (g, True), (g1, False)):
        torch.library.opcheck(op.delta_chunk_fwd, (q, k, v, beta, gate, h0, 0.3, 16, True, None, l2))
    # the backward's inputs as the forward's autograd passes them
    xd = [None if t is None else t.detach() for t in (q, k, v, beta, g, h0)]
    res = op.delta_chunk_fwd(*xd[:5], xd[5], 0.3, 16, True)
    o, ht, hs, w, u, t, _, _, _, _, aqk, bkk = res
    assert (aqk.dim() == 4) == save_scores and (bkk.dim() == 4) == save_scores
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    base = (*xd[:5], hs, w, u, t, do, dht, 0.3, 16, None, None, None)
    torch.library.opcheck(op.delta_chunk_bwd, base)
    if save_scores:
        torch.library.opcheck(op.delta_chunk_bwd, (*base, aqk, bkk))
        got = op.delta_chunk_bwd(*base, aqk, bkk)
        want = op.delta_chunk_bwd(*base)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _close(f"gradient {i}", a, b, SAME)


def test_sixteen_bit_inputs_with_saved_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 q, k, v (the split-level score backward, ``DELTA_SCORE_BWD_V2``): the switch on gives the
    switch off's output, state and gradients."""
    xs = _inputs(40, h=2, seed=6)
    low = [t.to(torch.bfloat16) if i < 3 and t is not None else t for i, t in enumerate(xs)]  # (q, k, v)
    on = _chunk_run(low, 16, True, monkeypatch)
    off = _chunk_run(low, 16, False, monkeypatch)
    assert on[0].dtype == torch.bfloat16
    for name, a, b in zip(_names(xs), on, off, strict=True):
        _close(name, a.float(), b.float(), SAME if DEV.type == "cpu" else 1e-2)


def test_what_the_backward_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the switch on autograd keeps two more (B, H, NP, chunk) float32 tensors, nothing else."""
    op = _op()
    xs = _inputs(40, h=2, seed=8)

    def saved_bytes() -> int:
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in xs]
        sizes: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            sizes[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            op.delta_chunk(*leaves[:5], 0.3, leaves[5], 16)
        return sum(sizes.values())

    monkeypatch.setattr(op, "DELTA_SAVE_SCORES", False)
    off = saved_bytes()
    monkeypatch.setattr(op, "DELTA_SAVE_SCORES", True)
    on = saved_bytes()
    assert on - off == 2 * (1 * 2 * 48 * 16 * 4), (on, off)
