"""The decode step's launch plan (``attnlab.kernels.linear.op.step_plan``): made once per signature of the
step's inputs (shapes, the strides of g / beta / h0, dtypes, device, flags) and never reused across
signatures; a launch through a plan gives bit for bit what the launch without one gave (every operand
expanded and made contiguous per call); and a prepared op's decode step makes no view or copy on the host.
Tiny shapes: on a CPU machine the step kernel runs in Triton's interpreter."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.testing import device_under_test, on_cuda

DEV = device_under_test()
B, H, N, DK, DV = 2, 3, 2, 8, 80  # (DV = 80: two value blocks of 64)


def _op():  # type: ignore[no-untyped-def]
    from attnlab.kernels.linear import op

    return op


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Any, Any]]:
    """An empty plan cache for the test (the module's own is left as it was)."""
    fresh: dict[Any, Any] = {}
    monkeypatch.setattr(_op(), "_STEP_PLANS", fresh)
    yield fresh


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _gate(*shape: int, seed: int) -> Tensor:
    return F.logsigmoid(_rand(*shape, seed=seed) + 1.0)


def _uncached_launch(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, l2: bool
) -> tuple[Tensor, Tensor]:
    """The step launch as it was before plans: every operand expanded and made contiguous per call, a
    4-D gate expanded to one value per channel (its per-token values copied across the channels)."""
    op = _op()
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    bk, _, bv, _ = op._blocks(dk, dv)
    o = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    ht = torch.empty(b, h, dk, dv, dtype=torch.float32, device=q.device)
    g3 = g is not None and g.dim() == 3
    gc = ht if g is None else (g.expand(b, h, n) if g3 else g.expand(b, h, n, dk)).contiguous()
    bc = ht if beta is None else beta.expand(b, h, n).contiguous()
    h0c = ht if h0 is None else h0.float().contiguous()
    op.recurrent_step_kernel[(-(-dv // bv), b * h)](
        q.contiguous(), k.contiguous(), v.contiguous(), gc, bc, h0c, o, ht, ht, n, dk, dv, 0.3,
        HAS_G=g is not None, HAS_H0=h0 is not None, DELTA=beta is not None, BK=bk, BV=bv, G_SCALAR=g3,
        L2NORM=l2, CHECK=False, num_warps=4,
    )  # fmt: skip
    return o, ht


def _case(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, bool]:
    """(q, k, v, g, beta, h0, qk_l2norm) of one signature of the step's inputs."""
    q, k = _rand(B, H, N, DK, seed=1), _rand(B, H, N, DK, seed=2)
    v = _rand(B, H, N, DV, seed=3)
    beta = torch.rand(B, H, N, generator=torch.Generator().manual_seed(4)).to(DEV)
    h0 = _rand(B, H, DK, DV, seed=5)
    g: Tensor | None = _gate(B, H, N, DK, seed=6)
    if name == "delta-per-token-4d":  # Gated DeltaNet's (B, H, N, 1), read as it is
        return q, k, v, _gate(B, H, N, 1, seed=6), beta, h0, True
    if name == "delta-per-token-3d":
        return q, k, v, _gate(B, H, N, seed=6), beta, h0, True
    if name == "delta-per-channel":  # KDA
        return q, k, v, g, beta, h0, True
    if name == "delta-no-gate-no-state":
        return q, k, v, None, beta, None, False
    if name == "delta-broadcast":  # g and beta shared by the batch: copied per call
        return q, k, v, _gate(1, H, N, 1, seed=6), beta[:1], h0, True
    if name == "delta-strided":  # a gate, beta and state that are views with gaps: copied per call
        g_wide = _gate(B, H, N, 2 * DK, seed=6)
        beta_wide = torch.rand(B, H, 2 * N, generator=torch.Generator().manual_seed(4)).to(DEV)
        return q, k, v, g_wide[..., ::2], beta_wide[..., ::2], h0.transpose(-1, -2).contiguous().mT, True
    if name == "delta-bf16":  # bf16 q, k, v and state (the state made float32 per call)
        bf = torch.bfloat16
        return q.to(bf), k.to(bf), v.to(bf), g, beta, h0.to(bf), True
    if name == "gla":
        return q, k, v, g, None, h0, False
    if name == "gla-strided-q":
        return _rand(B, H, DK, N, seed=1).mT, k, v, g, None, h0, False
    raise AssertionError(name)


CASES = ["delta-per-token-4d", "delta-per-token-3d", "delta-per-channel", "delta-no-gate-no-state",
         "delta-broadcast", "delta-strided", "delta-bf16", "gla", "gla-strided-q"]  # fmt: skip


def test_a_planned_launch_equals_the_uncached_launch_bit_for_bit(plans: dict[Any, Any]) -> None:
    """Every case through one plan cache, in turn (a later case with the shapes of an earlier one but
    other strides or dtypes must get its own plan), each launched twice (the plan made, then reused):
    output and state equal the uncached launch's exactly."""
    op = _op()
    for name in CASES:
        q, k, v, g, beta, h0, l2 = _case(name)
        want = _uncached_launch(q, k, v, g, beta, h0, l2)
        for _ in range(2):
            got = op._step_launch(q, k, v, g, beta, h0, 0.3, l2, None)
            for a, b, what in zip(got, want, ("o", "state"), strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
                assert torch.equal(a, b), (name, what, float((a.float() - b.float()).abs().max()))
    assert len(plans) == len(CASES) - 1  # (q's strides are no part of it: q, k, v made contiguous per call)


def test_a_plan_serves_other_tensors_of_its_signature(plans: dict[Any, Any]) -> None:
    """A plan holds no data: the same signature with other tensors (a state and gates taken at an offset
    inside larger buffers, same shapes and strides) reuses the plan and reads the new memory: results equal
    the uncached launch's on those tensors."""
    op = _op()
    q, k, v, g, beta, h0, l2 = _case("delta-per-token-4d")
    assert g is not None and beta is not None and h0 is not None
    op._step_launch(q, k, v, g, beta, h0, 0.3, l2, None)
    made = len(plans)
    big_h0 = _rand(3 * h0.numel(), seed=11)
    h0b = big_h0[h0.numel() : 2 * h0.numel()].view(h0.shape)  # a storage offset, contiguous strides
    big_beta = torch.rand(2 * beta.numel(), generator=torch.Generator().manual_seed(12)).to(DEV)
    betab = big_beta[beta.numel() :].view(beta.shape)
    gb = _gate(*g.shape, seed=13)
    assert h0b.stride() == h0.stride() and h0b.storage_offset() > 0 and betab.storage_offset() > 0
    got = op._step_launch(q, k, v, gb, betab, h0b, 0.3, l2, None)
    assert len(plans) == made  # the same signature: the plan was reused
    want = _uncached_launch(q, k, v, gb, betab, h0b, l2)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    first = op._step_launch(q, k, v, g, beta, h0, 0.3, l2, None)
    assert not torch.equal(first[1], got[1])  # (the other inputs made another state)


def test_a_plan_is_made_once_per_signature(plans: dict[Any, Any]) -> None:
    """The same signature gets the same plan object; any change of what the launch depends on (a shape,
    q's dtype or device, the strides of g / beta / h0, h0's dtype, the flags) gets another; the plan says
    which of g, beta, h0 are read as they are."""
    op = _op()
    q, _, v, g, beta, h0, _ = _case("delta-per-token-4d")
    assert g is not None and beta is not None and h0 is not None

    def plan(**kw: Any) -> Any:
        a = {"q": q, "v": v, "g": g, "beta": beta, "h0": h0, "qk_l2norm": True, "check": False, **kw}
        return op.step_plan(**a)

    base = plan()
    assert plan() is base and len(plans) == 1
    assert (base.g_ready, base.beta_ready, base.h0_ready) == (True, True, True)
    assert base.consts["G_SCALAR"] and base.grid == (2, B * H)
    g_strided = _gate(B, H, N, 2, seed=6)[..., :1]
    others = {
        "q shape": plan(q=q[:1], g=g[:1], beta=beta[:1], h0=h0[:1]),
        "q dtype": plan(q=q.to(torch.bfloat16)),
        "v shape": plan(v=v[..., :64]),
        "g stride": plan(g=g_strided),
        "beta stride": plan(beta=beta.mT.contiguous().mT),
        "h0 dtype": plan(h0=h0.to(torch.bfloat16)),
        "h0 stride": plan(h0=h0.mT.contiguous().mT),
        "no g": plan(g=None),
        "no norm": plan(qk_l2norm=False),
        "check": plan(check=True),
    }
    assert len({id(p) for p in others.values()} | {id(base)}) == len(others) + 1
    assert not others["g stride"].g_ready and not others["h0 stride"].h0_ready
    assert not others["h0 dtype"].h0_ready and not others["beta stride"].beta_ready
    assert others["q shape"].grid == (2, H) and others["check"].consts["CHECK"]
    meta = q.to("meta")
    assert op._step_key(meta, v, g, beta, h0, True, False) != op._step_key(q, v, g, beta, h0, True, False)


def test_the_plan_cache_is_bounded(plans: dict[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op()
    monkeypatch.setattr(op, "STEP_PLANS_MAX", 2)
    q, _, v, *_ = _case("delta-per-channel")
    for n in (1, 2, 1, 2):
        op.step_plan(q[:, :, :n], v[:, :, :n], None, None, None, False, False)
    op.step_plan(q, v, None, None, None, True, False)
    assert len(plans) == 1


class _Launches:
    """Stands in for the step kernel: records each launch's keyword arguments and zeroes the range
    check's counts (``BAD``) as a valid launch would; runs nothing else."""

    def __init__(self) -> None:
        self.kwargs: list[dict[str, Any]] = []

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*a: Any, **kw: Any) -> None:
            self.kwargs.append(kw)
            if kw["CHECK"]:
                a[8].zero_()

        return launch


@pytest.mark.skipif(on_cuda(), reason="counts host ops with the kernel stubbed (tolist copies on a GPU)")
@pytest.mark.parametrize("method", ["gated_delta", "kda", "gla"])
@pytest.mark.parametrize("check", [True, False])
def test_a_decode_step_makes_no_view_or_copy_on_the_host(
    method: str, check: bool, plans: dict[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepared op's decode step (one token, a carried state, no gradients), repeated: one launch per
    call through one plan, and no aten op on the host but the outputs' allocations (and with
    ``check_values``, the range-check counts and their read)."""
    import attnlab

    op = _op()
    launches = _Launches()
    monkeypatch.setattr(op, "recurrent_step_kernel", launches)
    monkeypatch.setattr(attnlab.settings, "check_values", check)
    q, k, v = (_rand(1, 4, 1, 16, seed=s, dtype=torch.bfloat16) for s in (1, 2, 3))
    state = _rand(1, 4, 16, 16, seed=4)
    extra = {"g": _gate(1, 4, 1, 16, seed=5)}
    if method != "gla":
        extra["beta"] = torch.rand(1, 4, 1).to(DEV)
        if method == "gated_delta":
            extra["g"] = extra["g"][..., :1].contiguous()
    step = attnlab.prepare("gla" if method == "gla" else "gated_delta", causal=True, backend="triton")
    with torch.no_grad():
        step(q, k, v, state=state, **extra)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(q, k, v, state=state, **extra)
    assert len(launches.kwargs) == 4 and all(kw["CHECK"] == check for kw in launches.kwargs)
    assert len(plans) == 1
    allowed = {"aten::empty", "aten::new_empty"}
    if check:  # (the stub zeroing the counts, their read by tolist)
        allowed |= {"aten::zero_", "aten::fill_", "aten::resolve_conj", "aten::resolve_neg"}
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::")}
    assert ops <= allowed, sorted(ops - allowed)


def test_a_compiled_decode_step_traces_the_step_op_and_equals_eager() -> None:
    """Through a prepared op under ``torch.compile(fullgraph=True)`` the decode step is the custom op
    ``attnlab::linear_step`` in the graph (no plan, no direct launch while tracing), with eager's result;
    the traced runners hold no ``functools`` cache wrapper (dynamo warns at each)."""
    import attnlab

    step = attnlab.prepare("gated_delta", causal=True, backend="triton")
    q, k, v = (_rand(1, 2, 1, 16, seed=s) for s in (1, 2, 3))
    state = _rand(1, 2, 16, 16, seed=4)
    beta, g = torch.rand(1, 2, 1).to(DEV), _gate(1, 2, 1, 1, seed=5)

    def run(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        r = step(q, k, v, state=state, beta=beta, g=g)
        assert isinstance(r, attnlab.Result)
        return r.out, r.state

    targets: list[str] = []

    def record(gm: torch.fx.GraphModule, _: object) -> object:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = run(q, k, v, beta, g, state)
        got = torch.compile(run, fullgraph=True, backend=record)(q, k, v, beta, g, state)
    assert "attnlab.linear_step.default" in targets, targets
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # (no cache wrapper in traced code)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
