"""The gated linear (gla) backward's A/B switches in ``attnlab.kernels.linear.op`` (issue 9):
``GLA_BWD_FUSED`` (every per-chunk gradient by one ``gla_bwd_chunk_kernel`` launch: the intra-chunk sums
by log2(chunk) split dots, the chunk-end term and the gate cumsum's gradient folded in),
``GLA_BWD_H_PASS`` (the state gradient by one reverse sequential pass), ``GLA_SKIP_ZERO_GRADS`` (no zero
gradients made for the op's unused outputs), the fused kernel's ``GLA_BWD_UNROLL`` / ``GLA_BWD_BKS``, and
``GLA_BWD_SLICED`` (the key slices as programs: ``gla_bwd_sliced_kernel``, its JOINT / UNROLL choices).
Against the fp32 token recurrence: output, final state and every gradient (q, k, v, g, the initial state)
at odd lengths, on chunk boundaries and one past them, every chunk size, several key slices and a partial
value tile, decays near 0, the gate's cumsum gradient (``GLA_FUSED_GLUE`` off), only the output or only
the final state in the loss, packed sequences, bf16 inputs; which kernels the backward launches; the
reverse pass against stages 1 and 2. Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import gated_recurrence
from attnlab.testing import KernelLaunches, device_under_test

DEV = device_under_test()

#: Backward settings by name: module flags of the op (the defaults: the fused backward).
SETTINGS: dict[str, dict[str, object]] = {
    "defaults": {},
    "scan-not-h-pass": {"GLA_BWD_H_PASS": False},
    "levels-in-a-loop": {"GLA_BWD_UNROLL": False},
    "slices-of-32": {"GLA_BWD_BKS": 32},
    "zero-grads-made": {"GLA_SKIP_ZERO_GRADS": False},
    "sliced": {"GLA_BWD_SLICED": True, "GLA_BWD_SLICED_VERIFIED_ONLY": False},
    "sliced-pairs": {"GLA_BWD_SLICED": True, "GLA_BWD_SLICED_VERIFIED_ONLY": False, "GLA_BWD_SLICED_SPP": 2},
    "sliced-separate-unrolled": {
        "GLA_BWD_SLICED": True,
        "GLA_BWD_SLICED_VERIFIED_ONLY": False,
        "GLA_BWD_SLICED_JOINT": False,
        "GLA_BWD_SLICED_UNROLL": True,
    },
    "sliced-separate": {
        "GLA_BWD_SLICED": True,
        "GLA_BWD_SLICED_VERIFIED_ONLY": False,
        "GLA_BWD_SLICED_JOINT": False,
    },
    "sliced-unrolled": {
        "GLA_BWD_SLICED": True,
        "GLA_BWD_SLICED_VERIFIED_ONLY": False,
        "GLA_BWD_SLICED_UNROLL": True,
    },
    "previous-backward": {"GLA_BWD_FUSED": False, "GLA_BWD_H_PASS": False, "GLA_SKIP_ZERO_GRADS": False},
}


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


@pytest.fixture
def setting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The op module's backward flags as named by the test's ``setting`` parameter."""
    op = _op()
    for flag, value in SETTINGS[request.param].items():
        monkeypatch.setattr(op, flag, value)
    yield request.param


def _inputs(
    n: int, dk: int, dv: int, gates: str = "channel", *, h: int = 2, seed: int = 0, h0: bool = True
) -> list[Tensor | None]:
    """q, k, v, g, h0: g per channel ("channel": logsigmoid, mostly 0.5..1; "near-zero": e^-30 per token
    on half the channels: exp(-G) over a chunk would overflow)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, h, n, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, h, n, dv, generator=gen)
    g = F.logsigmoid(torch.randn(1, h, n, dk, generator=gen) + 1.0)
    if gates == "near-zero":
        g = torch.where(torch.arange(dk) % 2 == 0, -30.0 - torch.rand(1, h, n, dk, generator=gen), g)
    s0 = torch.randn(1, h, dk, dv, generator=gen) if h0 else None
    return [t.to(DEV) if t is not None else None for t in (q, k, v, g, s0)]


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


def _check(xs: list[Tensor | None], chunk: int, loss: str = "both", tol: float = 2e-5) -> None:
    """gla_chunk on xs = (q, k, v, g, h0) against the token recurrence: output and final state within
    ``tol``, every gradient within 5 ``tol``, the loss on the output, the final state or both."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in xs]
    q, k, v, g, h0 = leaves
    assert q is not None and k is not None and v is not None
    o, s = _op().gla_chunk(q, k, v, g, 0.3, h0, chunk)
    rq, rk, rv, rg, rh0 = ref
    assert rq is not None and rk is not None and rv is not None
    ro, rs = gated_recurrence(rq, rk, rv, rg, 0.3, rh0)
    _close("o", o, ro, tol)
    _close("state", s, rs, tol)
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)

    def objective(out: Tensor, state: Tensor) -> Tensor:
        terms = {"out": [(out * do).sum()], "state": [(state * ds).sum()]}
        return sum(terms.get(loss, terms["out"] + terms["state"]))  # type: ignore[return-value]

    wrt = [t for t in leaves if t is not None]
    got = torch.autograd.grad(objective(o, s), wrt, allow_unused=True)
    want = torch.autograd.grad(objective(ro, rs), [t for t in ref if t is not None], allow_unused=True)
    names = [nm for nm, t in zip(("dq", "dk", "dv", "dg", "dh0"), xs, strict=True) if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:  # (the final state alone does not depend on q)
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a is not None, name
        _close(name, a, b, 5 * tol)


#: (n, chunk, K, V, gates) by id.
CASES = {
    "n1": (1, 16, 8, 12, "channel"),
    "n63": (63, 16, 8, 12, "channel"),
    "two-whole-chunks": (32, 16, 16, 8, "channel"),
    "one-past-a-boundary": (33, 16, 16, 8, "channel"),
    "n100-chunk32": (100, 32, 16, 16, "channel"),
    "n70-chunk64-k40-v24": (70, 64, 40, 24, "channel"),
    "near-zero-decay": (40, 16, 16, 8, "near-zero"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("setting", ["defaults", "sliced", "sliced-pairs"], indirect=True)
def test_the_fused_backward_matches_the_recurrence(setting: str, case: str) -> None:
    """Output, final state and the gradients of q, k, v, g and h0 by the default (fused) backward and by
    the sliced one, one key slice per program or two (with K = 40: three slices of 16, the second
    program's second slice wholly past K): lengths 1 and 63, whole chunks and one token past them, every chunk size, three key
    slices with a partial one and a partial value tile (K = 40, V = 24), decays near 0 on half the
    channels."""
    n, chunk, dk, dv, gates = CASES[case]
    _check(_inputs(n, dk, dv, gates), chunk, tol=4e-5 if chunk == 64 else 2e-5)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "defaults"], indirect=True)
def test_each_setting_matches_the_recurrence(setting: str) -> None:
    """Every other setting (each switch off, the levels in a loop, slices of 32 channels, all off: the
    previous backward) on a partial last chunk with decays near 0, two key slices of 16 (one partial)."""
    _check(_inputs(35, 24, 16, "near-zero", seed=1), 16)


@pytest.mark.parametrize("setting", ["defaults", "sliced"], indirect=True)
def test_the_gate_cumsum_gradient_path_matches_the_recurrence(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GLA_FUSED_GLUE`` off: the op takes the PyTorch cumsum G and returns dG (the chunk-end term on each
    chunk's last row, no reverse cumsum in the kernel); autograd carries it back to g."""
    monkeypatch.setattr(_op(), "GLA_FUSED_GLUE", False)
    _check(_inputs(45, 16, 8, seed=2), 16)


@pytest.mark.parametrize("loss", ["out", "state"])
@pytest.mark.parametrize("setting", ["defaults", "zero-grads-made"], indirect=True)
def test_a_loss_on_the_output_or_the_final_state_alone(setting: str, loss: str) -> None:
    """Only o, or only the final state, in the loss: with ``GLA_SKIP_ZERO_GRADS`` the backward gets None for
    the other (a zero do made in the backward; no dht), and the gradients are the recurrence's."""
    _check(_inputs(40, 16, 8, seed=3), 16, loss=loss)


@pytest.mark.parametrize("setting", ["defaults"], indirect=True)
def test_packed_sequences_run_each_sequence_alone(setting: str) -> None:
    """``gla_chunk_varlen`` (an empty sequence, one shorter than a chunk, one over two chunk boundaries):
    every gradient equals the recurrence run on each sequence alone from its own initial state."""
    cu = [0, 5, 5, 40, 61]
    q, k, v, g, _ = _inputs(61, 8, 8, seed=4, h0=False)
    h0 = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(4)).to(DEV)
    xs = [q, k, v, g, h0]
    leaves = [t.clone().requires_grad_(True) for t in xs]  # type: ignore[union-attr]
    ref = [t.clone().requires_grad_(True) for t in xs]  # type: ignore[union-attr]
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
    gen = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, want, strict=True):
        _close(name, a, b, 1e-4)


@pytest.mark.parametrize("setting", ["defaults"], indirect=True)
def test_bfloat16_inputs_and_gate_give_bfloat16_gradients(setting: str) -> None:
    """bf16 q, k, v and g: dq, dk, dv and dg come back in bf16 and within the bf16 rounding of the fp32
    recurrence's gradients (the interpreter's dots run in fp32: the H100 check applies the 3x rule)."""
    q, k, v, g, h0 = (t for t in _inputs(50, 16, 16, seed=6) if t is not None)
    xs = [q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), g.to(torch.bfloat16), h0]
    leaves = [t.clone().requires_grad_(True) for t in xs]
    ref = [t.float().clone().requires_grad_(True) for t in xs]
    o, s = _op().gla_chunk(*leaves[:4], 0.25, leaves[4], 16)
    ro, rs = gated_recurrence(ref[0], ref[1], ref[2], ref[3], 0.25, ref[4])
    got = torch.autograd.grad(o.float().sum() + s.sum(), leaves)
    want = torch.autograd.grad(ro.sum() + rs.sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, want, strict=True):
        assert a.dtype == (torch.float32 if name == "dh0" else torch.bfloat16), name
        peak = float(b.abs().max())
        _close(name, a.float() / peak, b / peak, 1e-2)


KERNELS = [
    "gla_h_kernel", "chunk_local_state_kernel", "chunk_scan_kernel", "gla_bwd_chunk_kernel",
    "gla_bwd_inter_kernel", "gla_bwd_sub_kernel", "gate_cumsum_bwd_kernel", "intra_scores_v2_kernel",
    "gla_bwd_sliced_kernel",
]  # fmt: skip


def _backward_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels (of ``KERNELS``) that one backward of gla_chunk launches: 40 tokens, K = V = 8, chunk
    16, per-channel gates and an initial state."""
    launches = KernelLaunches(monkeypatch, _op(), KERNELS)
    q, k, v, g, h0 = _inputs(40, 8, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, h0)]  # type: ignore[union-attr]
    o, s = _op().gla_chunk(*leaves[:4], 0.3, leaves[4], 16)
    launches.seen.clear()
    (o.sum() + s.sum()).backward()
    return launches.seen


@pytest.mark.parametrize(
    "setting", ["defaults", "scan-not-h-pass", "previous-backward", "sliced"], indirect=True
)
def test_the_backward_launches_what_its_switches_say(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-channel gates: the defaults' backward is two launches (the reverse state pass, the fused chunk
    kernel: float32 inputs are not a schedule of the sliced kernel checked on the H100); with the scan,
    stages 1 and 2 then the fused kernel; the previous backward: stages 1 and 2, the split kernels and the
    gate cumsum's backward; the sliced kernel wherever asked for (``GLA_BWD_SLICED_VERIFIED_ONLY`` off)."""
    seen = _backward_launches(monkeypatch)
    want = {
        "defaults": ["gla_h_kernel", "gla_bwd_chunk_kernel"],
        "scan-not-h-pass": ["chunk_local_state_kernel", "chunk_scan_kernel", "gla_bwd_chunk_kernel"],
        "previous-backward": [
            "chunk_local_state_kernel", "chunk_scan_kernel", "gla_bwd_inter_kernel", "gla_bwd_sub_kernel",
            "gate_cumsum_bwd_kernel",
        ],
        "sliced": ["gla_h_kernel", "gla_bwd_sliced_kernel"],
    }[setting]  # fmt: skip
    assert seen == want


@pytest.mark.parametrize("gate", ["channel", "token"])
@pytest.mark.parametrize("varlen", [False, True])
def test_the_reverse_state_pass_equals_stages_1_and_2(gate: str, varlen: bool) -> None:
    """``gla_dh`` (``gla_h_kernel`` with ``REVERSE``): the state gradient at every chunk end and the initial
    state's, equal to ``chunk_states(..., backward=True)``'s; per-channel gates and one per token, two key
    tiles and two value tiles, with and without the final state's gradient, packed sequences (each
    sequence's own final-state gradient)."""
    op = _op()
    n, dk, dv = 70, 40, 24
    q, _, do, g, _ = _inputs(n, dk, dv, h=3, seed=8)
    assert q is not None and do is not None and g is not None
    seq = torch.tensor([0, 2, 3, 5], dtype=torch.int32).to(DEV) if varlen else None
    gc = op.chunk_cumsum(g, 1, 3, n, dk, 16, q.device)
    if gate == "token":
        gc = op.chunk_cumsum_scalar(g[..., 0], 1, 3, n, 16, q.device)
    gen = torch.Generator().manual_seed(9)
    for dht in (None, torch.randn(3 if varlen else 1, 3, dk, dv, generator=gen).to(DEV)):
        got_hs, got_h0 = op.gla_dh(q, do, gc, dht, 0.3, 16, seq)
        want_hs, want_h0, _ = op.chunk_states(q, do, gc, dht, 0.3, 16, True, seq_chunks=seq)
        _close("dhs", got_hs, want_hs, 2e-5)
        _close("dh0", got_h0, want_h0, 2e-5)


def test_fused_backward_falls_back_when_the_gpu_lacks_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the fused chunk kernel does not fit (Triton's OutOfResources at launch), the backward runs the
    previous kernels: still the recurrence's gradients."""
    from triton.runtime.errors import OutOfResources

    tried: list[object] = []

    class TooBig:
        def __getitem__(self, grid: object) -> None:
            tried.append(grid)
            raise OutOfResources(130000, 101376, "shared memory")

    monkeypatch.setattr(_op(), "gla_bwd_chunk_kernel", TooBig())
    _check(_inputs(40, 16, 8), 16)
    assert tried  # the fused kernel was tried first


def _stand_in(dtype: torch.dtype, dk: int, dv: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    """q and v as ``sliced_verified`` sees them, on a CUDA device (no GPU needed)."""
    q = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, shape=(1, 2, 64, dk))
    return q, SimpleNamespace(shape=(1, 2, 64, dv))


def test_the_sliced_kernel_runs_only_where_its_schedule_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sliced_verified``: 16-bit inputs with K = V = 128 exactly, chunk 64, the default slice (16), 8 or 1 slices
    per program, joint levels and 4 warps, on an sm_90 GPU; not float32, K = 64, chunk 32, 8 warps, slices
    of 32, 2 or 4 slices per program, levels in two passes, unrolled levels, 2 stages, any other launch
    option, K = 100 / 112 or V = 120 (a K below 128 changes the slices), another GPU, or CPU tensors."""
    from attnlab.kernels.linear import launch_gla

    op = _op()
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])

    def ok(dtype: torch.dtype = torch.bfloat16, dk: int = 128, dv: int = 128, chunk: int = 64) -> bool:
        q, v = _stand_in(dtype, dk, dv)
        return launch_gla.sliced_verified(q, v, chunk)  # type: ignore[arg-type]

    assert ok() and ok(torch.float16)
    assert not ok(dk=100) and not ok(dv=120) and not ok(dk=112)  # (K, V exactly: other slices compile)
    with monkeypatch.context() as mp:
        mp.setattr(op, "GLA_BWD_SLICED_SPP", 1)
        assert ok()
    assert not ok(torch.float32) and not ok(dk=64) and not ok(dv=64) and not ok(chunk=32)
    for flag, value in (
        ("GLA_BWD_SLICED_BKS", 32),
        ("GLA_BWD_SLICED_JOINT", False),
        ("GLA_BWD_SLICED_UNROLL", True),
        ("GLA_BWD_SLICED_SPP", 2),
        ("GLA_BWD_SLICED_SPP", 4),
    ):
        with monkeypatch.context() as mp:
            mp.setattr(op, flag, value)
            assert not ok(), flag
    for over in ({"num_warps": 8}, {"num_stages": 2}, {"maxnreg": 128}):
        with monkeypatch.context() as mp:
            mp.setitem(op.LAUNCH_OVERRIDES, "gla_bwd_sliced", over)
            assert not ok(), over
    cap[0] = (8, 0)
    assert not ok()
    cap[0] = (9, 0)
    assert not launch_gla.sliced_verified(torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16),
                                          torch.zeros(1, 2, 64, 128), 64)  # fmt: skip


@pytest.mark.parametrize("setting", ["sliced"], indirect=True)
def test_the_sliced_schedule_timed_equals_the_fused_kernel(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schedule the benchmark times (bf16, K = V = 128, chunk 64, the default slices): every gradient
    of the sliced kernel against the fused kernel's on the same inputs (a partial last chunk), within
    bf16 rounding of their different summation orders."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 1, 100, 128, generator=gen) for _ in range(3)]
    g = F.logsigmoid(torch.randn(1, 1, 100, 128, generator=gen) + 3.0) / 8
    xs = [t.to(DEV, torch.bfloat16) for t in (*xs, g)]
    do = torch.randn(1, 1, 100, 128, generator=gen).to(DEV, torch.bfloat16)

    def grads(sliced: bool) -> tuple[Tensor, ...]:
        with monkeypatch.context() as mp:
            mp.setattr(_op(), "GLA_BWD_SLICED", sliced)
            leaves = [t.clone().requires_grad_(True) for t in xs]
            o, _ = _op().gla_chunk(*leaves, 128**-0.5, None, 64)
            return torch.autograd.grad(o, leaves, do)

    for name, a, b in zip(("dq", "dk", "dv", "dg"), grads(True), grads(False), strict=True):
        peak = float(b.float().abs().max())
        _close(name, a.float() / peak, b.float() / peak, 1e-2)


def test_the_sliced_layout_and_its_bad_widths() -> None:
    """``sliced_layout``: (slice width, slices, slices per program) from the real K; a width that is not a
    power of two >= 16 is refused with a message naming it."""
    from attnlab.kernels.linear import launch_gla

    assert launch_gla.sliced_layout(128) == (16, 8, 8)
    assert launch_gla.sliced_layout(100) == (16, 7, 7)
    assert launch_gla.sliced_layout(8) == (16, 1, 1)  # (K = 8: one slice, its tile 16 wide)
    op = _op()
    for width in (8, 24, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(op, "GLA_BWD_SLICED_BKS", width)
            with pytest.raises(ValueError, match=rf"power of two >= 16 \(a dot's size\); got {width}"):
                launch_gla.sliced_layout(128)


@pytest.mark.parametrize("setting", ["sliced"], indirect=True)
def test_more_chunks_than_the_grid_axis_holds_run_the_fused_kernel(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sliced kernel's chunk axis is the grid's second (at most 65535): a sequence of more chunks runs
    the fused kernel (the limit lowered to 2 chunks here; 3 chunks of 16)."""
    from attnlab.kernels.linear import launch_gla

    monkeypatch.setattr(launch_gla, "GRID_Y_MAX", 2)
    seen = _backward_launches(monkeypatch)
    assert seen == ["gla_h_kernel", "gla_bwd_chunk_kernel"]
