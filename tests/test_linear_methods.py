"""The linear family's methods (``attnlab/catalog/linear``): references state their conventions, the
chunked PyTorch backend matches the token-by-token recurrence (output, final state, every gradient), a
state carried across two calls equals one pass, and bad input gets a clear error.

The methods are registered at import; ``registered(...)`` in the tests leaves an already registered spec
as it is.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.catalog.linear import SPECS, based, gated_delta, gla, lightning, linear
from attnlab.core import MethodSpec, Result
from attnlab.errors import BackendError, InputError, ParamError, UnsupportedPatternError
from attnlab.testing import device_under_test

BY_NAME = {s.name: s for s in SPECS}


@contextlib.contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """The linear methods are registered at import: each test checks that ``spec`` is the one in use."""
    assert attnlab.get(spec.name) is spec
    yield spec


DEV = device_under_test()


@pytest.fixture
def reg(request: pytest.FixtureRequest) -> Iterator[None]:
    names = request.param if isinstance(request.param, tuple) else (request.param,)
    with registered(BY_NAME[names[0]]):
        yield


def inputs(
    name: str, b: int, h: int, hk: int, n: int, d: int, *, seed: int = 0, dev: torch.device | str = DEV
) -> dict[str, Tensor]:
    """q, k, v and the method's tensor inputs (gates in a realistic range: decays 0.3..1)."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "q": torch.randn(b, h, n, d, generator=g),
        "k": torch.randn(b, hk, n, d, generator=g),
        "v": torch.randn(b, hk, n, d, generator=g),
    }
    if name == "gla":
        out["g"] = F.logsigmoid(torch.randn(b, h, n, d, generator=g) + 2.0)
    if name == "gated_delta":
        out["beta"] = torch.rand(b, h, n, generator=g)
        out["g"] = F.logsigmoid(torch.randn(b, h, n, d, generator=g) + 2.0)
    return {name: t.to(dev) for name, t in out.items()}


def _state_list(state: Any) -> list[Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def _call(name: str, x: dict[str, Tensor], state: Any = None, **params: Any) -> Result:
    q, k, v = x["q"], x["k"], x["v"]
    extra = {n: t for n, t in x.items() if n not in "qkv"}
    params.setdefault("backend", "torch_chunk")
    op = attnlab.prepare(name, causal=params.pop("causal", True), **params)
    res = op(q, k, v, state=state, **extra)
    assert isinstance(res, Result)
    return res


def _reference(name: str, x: dict[str, Tensor], state: Any = None, **params: Any) -> tuple[Tensor, Any]:
    spec = BY_NAME[name]
    q, k, v = x["q"], x["k"], x["v"]
    extra = {n: t for n, t in x.items() if n not in "qkv"}
    causal = params.pop("causal", True)
    out: tuple[Tensor, Any] = spec.reference(
        q, k, v, spec.make_params(params), causal=causal, scale=q.shape[-1] ** -0.5, state=state, **extra
    )
    return out


PARAMS: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("linear", {"feature_map": "relu", "normalize": False}),
    ("linear", {"feature_map": "identity", "normalize": False}),
    ("lightning", {}),
    ("gla", {}),
    ("gated_delta", {}),
    ("gated_delta", {"qk_l2norm": False}),
    ("based", {}),
    ("based", {"mixer": "window", "window": 5}),
]


def _has_triton(name: str) -> bool:
    return any(b.name == "triton" for b in BY_NAME[name].backends)


BACKEND_CASES = [
    (name, params, backend, n)
    for name, params in PARAMS
    for backend in ("torch_chunk", "triton")
    for n in ((1, 63, 100) if backend == "torch_chunk" else (63,))
    # (the kernels' own tests cover lengths and chunk boundaries; here each method's use of them)
    if backend == "torch_chunk" or (_has_triton(name) and params.get("feature_map") != "identity")
]


@pytest.mark.parametrize(
    ("name", "params", "backend", "n"),
    BACKEND_CASES,
    ids=[f"{n}-{b}-{p}-N{n_}" for n, p, b, n_ in BACKEND_CASES],
)
def test_backend_matches_the_recurrence_output_state_and_gradients(
    name: str, params: dict[str, Any], backend: str, n: int
) -> None:
    with registered(BY_NAME[name]):
        x = inputs(name, 1, 4, 2, n, 8)
        if name == "gated_delta" and not params.get("qk_l2norm", True):
            x["k"] = F.normalize(x["k"], dim=-1)  # the raw rule needs ||k|| <= 1 to stay bounded
        leaves = {kk: t.clone().requires_grad_(True) for kk, t in x.items()}
        ref_leaves = {kk: t.clone().requires_grad_(True) for kk, t in x.items()}
        s0 = _reference(name, inputs(name, 1, 4, 2, 5, 8, seed=1), **params)[1]  # a non-zero start state
        s0_a = [t.clone().requires_grad_(True) for t in _state_list(s0)]
        s0_b = [t.clone().requires_grad_(True) for t in _state_list(s0)]
        op = attnlab.prepare(name, causal=True, backend=backend, chunk=16, **params)
        extra = {kk: t for kk, t in leaves.items() if kk not in "qkv"}
        res = op(leaves["q"], leaves["k"], leaves["v"], state=_pack(s0_a), **extra)
        assert isinstance(res, Result)
        ref_out, ref_state = _reference(name, ref_leaves, _pack(s0_b), **params)
        close(res.out, ref_out, 2e-5)
        for a, b in zip(_state_list(res.state), _state_list(ref_state), strict=True):
            assert a.dtype == torch.float32
            close(a, b, 2e-5)
        # every gradient, through the output and the final state
        gen = torch.Generator().manual_seed(3)
        dout = torch.randn(res.out.shape, generator=gen).to(DEV)
        dstate = [torch.randn(t.shape, generator=gen).to(DEV) for t in _state_list(res.state)]
        got_loss = _loss(res.out, res.state, dout, dstate)
        ref_loss = _loss(ref_out, ref_state, dout, dstate)
        names = list(leaves)
        got = torch.autograd.grad(got_loss, [leaves[kk] for kk in names] + s0_a)
        want = torch.autograd.grad(ref_loss, [ref_leaves[kk] for kk in names] + s0_b)
        for label, a, b in zip([*names, *("state",) * len(s0_a)], got, want, strict=True):
            close(a, b, 5e-5, f"d{label}")


def close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    """|a - b| <= tol * (1 + max|b|) everywhere: fp32 paths that sum in another order (chunks, GPU
    matmuls) differ by rounding relative to the largest value (outputs grow like 1/(1 - decay))."""
    a, b = a.detach().float(), b.detach().float()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    peak = float(b.abs().max()) if b.numel() else 0.0
    assert err <= tol * (1 + peak), f"{what} max error {err:.3e} > {tol:.0e} x (1 + max {peak:.3e})"


def _loss(out: Tensor, state: Any, dout: Tensor, dstate: list[Tensor]) -> Tensor:
    loss = (out * dout).sum()
    for s, d in zip(_state_list(state), dstate, strict=True):
        loss = loss + (s * d).sum()
    return loss


def _pack(states: list[Tensor]) -> Any:
    return tuple(states) if len(states) == 2 else states[0]


CARRY = [
    (n, b)
    for n in ("linear", "lightning", "gla", "gated_delta")
    for b in ("torch_chunk", "triton")
    if b == "torch_chunk" or _has_triton(n)
]


@pytest.mark.parametrize(("name", "backend"), CARRY, ids=[f"{n}-{b}" for n, b in CARRY])
def test_a_state_carried_across_two_calls_equals_one_pass(name: str, backend: str) -> None:
    with registered(BY_NAME[name]):
        x = inputs(name, 1, 2, 2, 50, 8)
        whole = _call(name, x, chunk=16, backend=backend)
        first = _call(name, {kk: t[:, :, :21] for kk, t in x.items()}, chunk=16, backend=backend)
        second = _call(
            name, {kk: t[:, :, 21:] for kk, t in x.items()}, first.state, chunk=16, backend=backend
        )
        close(torch.cat([first.out, second.out], 2), whole.out, 1e-5)
        for a, b in zip(_state_list(second.state), _state_list(whole.state), strict=True):
            close(a, b, 1e-5)
        # decode: one token at a time from the prefill's state
        state = _call(name, {kk: t[:, :, :48] for kk, t in x.items()}, chunk=16, backend=backend).state
        for t in (48, 49):  # (the triton backend takes its step kernel here)
            step = _call(
                name, {kk: v[:, :, t : t + 1] for kk, v in x.items()}, state, chunk=16, backend=backend
            )
            close(step.out, whole.out[:, :, t : t + 1], 1e-5)
            state = step.state


@pytest.mark.parametrize("name", ["linear", "lightning", "gla", "gated_delta"])
def test_gqa_is_kv_shared_by_the_group_and_the_state_is_per_query_head(name: str) -> None:
    with registered(BY_NAME[name]):
        x = inputs(name, 1, 4, 2, 20, 8)
        rep = dict(x, k=x["k"].repeat_interleave(2, 1), v=x["v"].repeat_interleave(2, 1))
        a, b = _call(name, x, chunk=16), _call(name, rep, chunk=16)
        torch.testing.assert_close(a.out, b.out)
        assert _state_list(a.state)[0].shape == (1, 4, 8, 8)


def test_gla_recurrence_is_the_closed_form_with_inclusive_decay() -> None:
    """o_i = scale * sum_{j<=i} sum_d q_id k_jd exp(g_{j+1,d} + ... + g_{i,d}) v_j: token j is written
    undecayed at step j and decays at every later step (decay, write, read)."""
    x = inputs("gla", 1, 2, 2, 9, 4, dev="cpu")
    o, s = _reference("gla", x)
    q, k, v, g = x["q"][0], x["k"][0], x["v"][0], x["g"][0]
    cum = g.cumsum(1)  # (H, N, D)
    for i in range(9):
        w = torch.einsum(
            "hd,hjd,hjd->hj", q[:, i], k[:, : i + 1], torch.exp(cum[:, i : i + 1] - cum[:, : i + 1])
        )
        torch.testing.assert_close(o[0, :, i], 0.5 * torch.einsum("hj,hjv->hv", w, v[:, : i + 1]))
    torch.testing.assert_close(s[0], torch.einsum("hjd,hjv->hdv", k * torch.exp(cum[:, -1:] - cum), v))


def test_lightning_default_decays_are_exp_minus_alibi_slopes() -> None:
    assert lightning.alibi_slopes(8) == [2.0 ** (-i) for i in range(1, 9)]
    assert lightning.alibi_slopes(6) == [*(2.0 ** (-2 * i) for i in range(1, 5)), 2.0**-1, 2.0**-3]
    x = inputs("lightning", 1, 8, 8, 6, 4, dev="cpu")
    o, _ = _reference("lightning", x)
    lam = torch.exp(-torch.tensor(lightning.alibi_slopes(8)))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    decay = torch.where(j <= i, lam[:, None, None] ** (i - j).clamp(min=0), 0.0)
    want = 0.5 * (decay * (x["q"][0] @ x["k"][0].transpose(-1, -2))) @ x["v"][0]
    torch.testing.assert_close(o[0], want)
    custom = torch.full((8,), 0.5)
    o2, _ = _reference("lightning", dict(x, decay=custom))
    want2 = (
        0.5 * (torch.where(j <= i, 0.5 ** (i - j).clamp(min=0), 0.0) * (x["q"][0] @ x["k"][0].mT)) @ x["v"][0]
    )
    torch.testing.assert_close(o2[0], want2)


@pytest.mark.parametrize("fm", ["elu", "relu"])
def test_normalised_linear_attention_is_a_weighted_mean_of_values(fm: str) -> None:
    x = inputs("linear", 1, 2, 2, 7, 4, dev="cpu")
    o, (_s, z) = _reference("linear", x, feature_map=fm)
    fq, fk = linear.feature_map(x["q"][0], fm), linear.feature_map(x["k"][0], fm)
    w = (fq @ fk.mT).tril()
    torch.testing.assert_close(o[0], (w @ x["v"][0]) / (w.sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(z[0], fk.sum(1))
    o_nc, _ = _reference("linear", x, feature_map=fm, causal=False)
    w = fq @ fk.mT
    torch.testing.assert_close(o_nc[0], (w @ x["v"][0]) / (w.sum(-1, keepdim=True) + 1e-6))


def test_deltanet_reads_back_what_it_wrote() -> None:
    """With beta = 1 and unit k, the write replaces the value stored at k: S^T k = v (scale 1)."""
    x = inputs("gated_delta", 1, 1, 1, 3, 4, dev="cpu")
    k = torch.zeros(1, 1, 3, 4)
    k[0, 0, :, 0] = 1.0  # the same key three times: each write overwrites
    x.update(k=k, q=k.clone(), beta=torch.ones(1, 1, 3))
    del x["g"]
    spec = BY_NAME["gated_delta"]
    o, _s = spec.reference(
        x["q"], x["k"], x["v"], spec.make_params({}), causal=True, scale=1.0, beta=x["beta"]
    )
    torch.testing.assert_close(o[0, 0], x["v"][0, 0], atol=1e-5, rtol=1e-5)  # (l2norm of a unit k: ~k)
    # per-head gate (B, H, N, 1) equals the same gate on every channel
    y = inputs("gated_delta", 1, 2, 2, 9, 4, dev="cpu")
    gh = F.logsigmoid(torch.randn(1, 2, 9, 1))
    a, _ = _reference("gated_delta", dict(y, g=gh))
    b, _ = _reference("gated_delta", dict(y, g=gh.expand(1, 2, 9, 4).clone()))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_method_spec_is_complete(spec: Any) -> None:
    assert spec.family == "linear" and spec.stateful and not spec.softmax_normalized
    assert len(inspect.getdoc(spec.reference) or "") > 40
    assert inspect.getdoc(spec.param_class)
    assert 1 <= len(spec.test_params) <= 3
    for p in spec.test_params:
        spec.make_params(p)
    for n in (128, 4096, 131072):
        for p in spec.bench_params(n):
            spec.make_params(p)
    assert attnlab.get(spec.name) is spec  # registered at import


# -- patterns and bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lightning", "gla", "gated_delta"])
def test_non_causal_and_cross_calls_are_refused(name: str) -> None:
    with registered(BY_NAME[name]):
        x = inputs(name, 1, 2, 2, 8, 4)
        with pytest.raises(UnsupportedPatternError, match="does not define the noncausal_self pattern"):
            _call(name, x, causal=False)
        y = dict(x, q=x["q"][:, :, :3])
        with pytest.raises(UnsupportedPatternError, match="causal_cross pattern"):
            _call(name, y)


def test_gate_and_beta_of_wrong_shape_dtype_or_device_are_refused() -> None:
    with registered(BY_NAME["gla"]):
        x = inputs("gla", 1, 2, 2, 8, 4)
        with pytest.raises(InputError, match=r"needs the tensor input g \(B, H, N_q, D\)"):
            _call("gla", {kk: t for kk, t in x.items() if kk != "g"})
        with pytest.raises(
            InputError, match=r"g has shape \(1, 2, 8\); method 'gla' expects \(B=1, H=2, N_q=8, D=4\)"
        ):
            _call("gla", dict(x, g=x["g"][..., 0]))
        with pytest.raises(InputError, match="g has dtype torch.int64; expected a floating dtype"):
            _call("gla", dict(x, g=torch.zeros(1, 2, 8, 4, dtype=torch.long)))
        with pytest.raises(InputError, match="g is on meta, but q, k, v are on (cpu|cuda)"):
            _call("gla", dict(x, g=torch.zeros(1, 2, 8, 4, device="meta")))
    with registered(BY_NAME["gated_delta"]):
        x = inputs("gated_delta", 1, 2, 2, 8, 4)
        with pytest.raises(
            InputError,
            match=r"beta has shape \(1, 2, 8, 1\); method 'gated_delta' expects \(B=1, H=2, N_q=8\)",
        ):
            _call("gated_delta", dict(x, beta=x["beta"][..., None]))
        with pytest.raises(InputError, match=r"g has shape \(1, 2, 8, 3\).*where any dim may be 1"):
            _call("gated_delta", dict(x, g=x["g"][..., :3]))
        bad = x["beta"].clone()
        bad[0, 1, 2] = float("nan")
        with pytest.raises(InputError, match="beta holds 1 NaN/Inf value"):
            _call("gated_delta", dict(x, beta=bad))


@pytest.mark.parametrize("name", ["gla", "gated_delta"])
def test_gates_outside_the_decay_range_or_nan_are_refused(name: str) -> None:
    with registered(BY_NAME[name]):
        x = inputs(name, 1, 2, 2, 8, 4)
        for value, what in (
            (0.5, "1 positive"),
            (float("nan"), "1 NaN"),
            (float("-inf"), r"1 -inf \(decay 0\)"),
        ):
            g = x["g"].clone()
            g[0, 0, 3, 1] = value
            with pytest.raises(InputError, match=f"g holds {what}.*decay in \\(0, 1\\]"):
                _call(name, dict(x, g=g))
            with pytest.raises(InputError, match=f"g holds {what}"):
                _reference(name, dict(x, g=g))


def _counting(fn: Any, log: list[Any], tag: Any) -> Any:
    """``fn`` that appends ``tag`` (None: its second argument, a name) to ``log`` on every call."""

    def wrapped(*a: Any, **k: Any) -> Any:
        log.append(a[1] if tag is None else tag)
        return fn(*a, **k)

    return wrapped


@pytest.mark.parametrize("name", ["gla", "gated_delta"])
def test_check_values_off_skips_the_gate_range_check(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """settings.check_values=False (a decode loop saving the host synchronisation) runs without reading the
    gates: a positive log-decay is not refused then, and valid gates give the same result as with it on."""
    from attnlab.catalog.linear import _common

    with registered(BY_NAME[name]):
        x = inputs(name, 1, 2, 2, 8, 4)
        want = _call(name, x)
        monkeypatch.setattr(attnlab.settings, "check_values", False)
        reads: list[int] = []
        real = torch.aminmax
        monkeypatch.setattr(_common.torch, "aminmax", _counting(real, reads, 1))
        got = _call(name, x)
        torch.testing.assert_close(got.out, want.out)
        g = x["g"].clone()
        g[0, 0, 3, 1] = 0.5
        _call(name, dict(x, g=g))  # not refused: the check is off
        assert reads == []


@pytest.mark.parametrize("name", ["gla", "gated_delta", "kda"])
def test_decode_checks_gates_in_the_step_kernel(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton decode step (few tokens, no gradients) with settings.check_values on checks g and beta in
    the step kernel: no reduction before the launch (aminmax is never called on valid gates), the same
    result as with the check off, and a bad value still gets the detailed error of the host check."""
    from attnlab.catalog.linear import _common
    from attnlab.kernels.linear import op as kop

    base = "gated_delta" if name == "kda" else name
    with registered(BY_NAME[base]):
        x = inputs(base, 1, 2, 2, 3, 16)
        if name == "gated_delta":
            x["g"] = x["g"][..., :1].contiguous()  # one gate per head (GDN); kda: per channel
        checks: list[bool] = []
        real_step = kop.linear_step

        def step(*a: Any) -> Any:
            checks.append(a[8] is not None)
            return real_step(*a)

        monkeypatch.setattr(kop, "linear_step", step)
        reads: list[int] = []
        monkeypatch.setattr(_common.torch, "aminmax", _counting(torch.aminmax, reads, 1))
        with torch.no_grad():
            got = _call(base, x, backend="triton")
            assert checks == [True] and reads == []
            monkeypatch.setattr(attnlab.settings, "check_values", False)
            want = _call(base, x, backend="triton")
            assert checks == [True, False]
            torch.testing.assert_close(got.out, want.out)
            torch.testing.assert_close(got.state, want.state)
            monkeypatch.setattr(attnlab.settings, "check_values", True)
            bad_inputs = [
                ("g", 0.5, "1 positive"),
                ("g", float("nan"), "1 NaN"),
                ("g", float("-inf"), "1 -inf"),
            ]
            if base == "gated_delta":
                bad_inputs.append(("beta", float("inf"), "1 NaN/Inf"))
            for what, value, msg in bad_inputs:
                t = x[what].clone()
                t.view(-1)[-1] = value
                with pytest.raises(InputError, match=f"{what} holds {msg}"):
                    _call(base, dict(x, **{what: t}), backend="triton")


@pytest.mark.parametrize("check", [True, False])
def test_lightning_decay_check_honours_check_values(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """settings.check_values: on, a decay outside (0, 1] is refused; off, the decays are not read (no
    reduction, no host synchronisation) and valid decays give the same result as with the check on."""
    with registered(BY_NAME["lightning"]):
        x = inputs("lightning", 1, 2, 2, 8, 4)
        x["decay"] = torch.tensor([0.9, 0.5], device=DEV)
        want = _call("lightning", x)
        monkeypatch.setattr(attnlab.settings, "check_values", check)
        reads: list[int] = []
        real = torch.Tensor.all
        monkeypatch.setattr(torch.Tensor, "all", _counting(real, reads, 1))
        got = _call("lightning", x)
        torch.testing.assert_close(got.out, want.out)
        assert (len(reads) > 0) == check
        bad = dict(x, decay=torch.tensor([0.9, 1.5], device=DEV))
        if check:
            with pytest.raises(InputError, match=r"decay holds 1 value\(s\) outside \(0, 1\]: \[1.5"):
                _call("lightning", bad)
        else:
            _call("lightning", bad)  # not refused: the check is off


@pytest.mark.parametrize("check", [True, False])
def test_linear_map_weight_check_honours_check_values(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """settings.check_values: on, NaN in a feature map's weights is refused naming the weight; off, the
    weights are not scanned (no host synchronisation) and valid weights give the same result."""
    from attnlab.catalog.linear import _common

    with registered(BY_NAME["linear"]):
        g = torch.Generator().manual_seed(3)
        x = inputs("linear", 1, 2, 2, 8, 4)
        x["map_q"] = linear.sample_map((2, 4, 4), g).to(DEV)
        x["map_k"] = linear.sample_map((2, 4, 4), g).to(DEV)
        want = _call("linear", x, feature_map="hedgehog")
        monkeypatch.setattr(attnlab.settings, "check_values", check)
        reads: list[str] = []
        real = _common.check_finite_input
        monkeypatch.setattr(linear, "check_finite_input", _counting(real, reads, None))
        got = _call("linear", x, feature_map="hedgehog")
        torch.testing.assert_close(got.out, want.out)
        assert reads == (["map_q", "map_k"] if check else [])
        bad_w = x["map_k"].clone()
        bad_w[0, 0, 0] = float("nan")
        if check:
            with pytest.raises(InputError, match="map_k holds 1 NaN/Inf value"):
                _call("linear", dict(x, map_k=bad_w), feature_map="hedgehog")
        else:
            out = _call("linear", dict(x, map_k=bad_w), feature_map="hedgehog").out
            assert torch.isnan(out).any()  # not refused: the check is off, the NaN reaches the output


def test_lightning_decays_outside_zero_one_are_refused() -> None:
    with registered(BY_NAME["lightning"]):
        x = inputs("lightning", 1, 2, 2, 8, 4)
        for bad in (0.0, 1.5, float("nan"), -0.2):
            with pytest.raises(InputError, match=r"decay holds 1 value\(s\) outside \(0, 1\]"):
                _call("lightning", dict(x, decay=torch.tensor([0.5, bad], device=DEV)))
        with pytest.raises(InputError, match=r"decay has shape \(3\); method 'lightning' expects \(H=2\)"):
            _call("lightning", dict(x, decay=torch.tensor([0.5, 0.5, 0.5], device=DEV)))
        _call("lightning", dict(x, decay=torch.tensor([1.0, 0.25], device=DEV)))  # the closed ends are fine


def test_a_state_that_does_not_fit_is_refused() -> None:
    with registered(BY_NAME["gla"]):
        x = inputs("gla", 1, 2, 2, 8, 4)
        with pytest.raises(
            InputError, match=r"state has shape \(1, 2, 4, 5\); this call needs \(1, 2, 4, 4\)"
        ):
            _call("gla", x, torch.zeros(1, 2, 4, 5))
        with pytest.raises(InputError, match="state is on meta"):
            _call("gla", x, torch.zeros(1, 2, 4, 4, device="meta"))
        with pytest.raises(InputError, match="carries one state tensor S"):
            _call("gla", x, (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4)))
    with registered(BY_NAME["linear"]):
        x = inputs("linear", 1, 2, 2, 8, 4)
        with pytest.raises(InputError, match=r"carries the state \(S, z\)"):
            _call("linear", x, torch.zeros(1, 2, 4, 4))
        with pytest.raises(InputError, match=r"state z has shape \(1, 2, 5\); this call needs \(1, 2, 4\)"):
            _call("linear", x, (torch.zeros(1, 2, 4, 4, device=DEV), torch.zeros(1, 2, 5, device=DEV)))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(
        ParamError, match="feature_map='identity' is invalid; expected elu or relu with normalize=True"
    ):
        linear.LinearParams(feature_map="identity")
    with pytest.raises(ParamError, match="feature_map='cos' is invalid"):
        linear.LinearParams(feature_map="cos")
    with pytest.raises(ParamError, match="chunk=0 is invalid"):
        gla.GLAParams(chunk=0)
    with pytest.raises(ParamError, match="qk_l2norm=1 is invalid"):
        gated_delta.GatedDeltaParams(qk_l2norm=1)  # type: ignore[arg-type]


def test_a_chunk_size_the_triton_kernels_cannot_take_is_a_refusal_naming_it() -> None:
    with registered(BY_NAME["gla"]):
        x = inputs("gla", 1, 2, 2, 8, 4)
        with pytest.raises(
            BackendError, match="the Triton kernels take chunk sizes 16, 32, 64, not chunk=24"
        ):
            _call("gla", x, chunk=24, backend="triton")
        assert _call("gla", x, chunk=24).out.shape == (1, 2, 8, 4)  # torch_chunk takes it


@pytest.mark.parametrize(
    ("name", "dtype", "d"), [("gla", torch.bfloat16, 256), ("lightning", torch.float32, 128)]
)
def test_a_backward_whose_state_tile_exceeds_shared_memory_is_a_refusal(
    name: str, dtype: torch.dtype, d: int
) -> None:
    """The chunked backward holds a whole (K, V) state tile: 256 x 256 in bf16 (gla's per-channel
    kernel, 335872 B compiled for sm_90) and 128 x 128 in float32 (the scalar-gate kernel, 278528 B) do
    not fit an H100's 232448 B. With gradients the Triton backend refuses, naming the tile; the call
    goes to torch_chunk; the forward alone still runs on Triton."""
    with registered(BY_NAME[name]):
        x = {kk: t.to(dtype) for kk, t in inputs(name, 1, 1, 1, 4, d, dev=DEV).items()}
        leaves = {kk: t.requires_grad_(kk in "qkv") for kk, t in x.items()}
        extra: dict[str, Any] = {kk: t for kk, t in leaves.items() if kk not in "qkv"}
        forced = attnlab.explain(leaves["q"], leaves["k"], leaves["v"], method=name, causal=True,
                                 backend="triton", **extra)  # fmt: skip
        assert forced.backend is None
        assert f"holds a {d} x {d} state tile" in str(forced) and "232448 B" in str(forced), str(forced)
        auto = attnlab.explain(leaves["q"], leaves["k"], leaves["v"], method=name, causal=True, **extra)
        assert auto.backend is not None and auto.backend.name == "torch_chunk"
        plain = {kk: t.detach() for kk, t in leaves.items()}
        rest: dict[str, Any] = {kk: t for kk, t in plain.items() if kk not in "qkv"}
        fwd = attnlab.explain(
            plain["q"], plain["k"], plain["v"], method=name, causal=True, backend="triton", **rest
        )
        assert fwd.backend is not None and fwd.backend.name == "triton"


def test_based_taylor_map_is_the_second_order_expansion_of_exp() -> None:
    q, k = torch.randn(5, 16), torch.randn(5, 16)
    s = 16**-0.5
    x = s * (q * k).sum(-1)
    dot = (based.taylor_map(q, s) * based.taylor_map(k, s)).sum(-1)
    torch.testing.assert_close(dot, 1 + x + x**2 / 2)
    assert based.taylor_map(q, s).shape == (5, 1 + 16 + 256)


def test_based_window_counts_keys_self_included_and_carries_its_tail() -> None:
    x = inputs("based", 1, 2, 2, 6, 4, dev="cpu")
    o1, _ = _reference("based", x, mixer="window", window=1)
    torch.testing.assert_close(o1, x["v"])  # one key: itself
    o3, tail = _reference("based", x, mixer="window", window=3)
    scores = (x["q"][0] @ x["k"][0].mT) * 0.5
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    p = torch.softmax(scores.masked_fill(~((j <= i) & (j > i - 3)), float("-inf")), -1)
    torch.testing.assert_close(o3[0], p @ x["v"][0])
    assert tail[0].shape == (1, 2, 2, 4)  # the last window - 1 keys
    with registered(BY_NAME["based"]):
        with pytest.raises(InputError, match=r"expected \(B=1, H_kv=2, L, D=4\) with L <= window - 1 = 2"):
            _call("based", x, (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), mixer="window", window=3)
        with pytest.raises(InputError, match="carries the state \\(k_tail, v_tail\\)"):
            _call("based", x, torch.zeros(1, 2, 2, 4), mixer="window", window=3)
        big = inputs("based", 1, 1, 1, 2, 65, dev="cpu")
        # the backend declares the limit (a refusal, before any work); the reference says the same
        with pytest.raises(
            BackendError, match=r"takes q/k head dims up to 64 \(1 \+ D \+ D\^2 = 4291 features at D=65\)"
        ):
            _call("based", big)
        with pytest.raises(InputError, match=r"D=65, so the Taylor map has 1 \+ D \+ D\^2 = 4291 features"):
            _reference("based", big)
        assert based.BasedParams().head_dim_limit() == 64
        assert based.BasedParams(mixer="window").head_dim_limit() is None
        wide = _call("based", big, mixer="window", window=2)  # the window mixer takes any head dim
        assert wide.out.shape == (1, 1, 2, 65)
        with pytest.raises(ParamError, match="mixer='conv' is invalid"):
            _call("based", x, mixer="conv")


def test_a_triton_prefill_continues_in_the_torch_backend_and_back() -> None:
    """Both backends carry the same state (float32, (B, H, K, V)): a prefill's state continues in either."""
    with registered(BY_NAME["gla"]):
        x = inputs("gla", 1, 2, 2, 40, 8)
        whole = _call("gla", x, chunk=16)
        first = _call("gla", {kk: t[:, :, :17] for kk, t in x.items()}, chunk=16, backend="triton")
        second = _call("gla", {kk: t[:, :, 17:] for kk, t in x.items()}, first.state, chunk=32)
        close(torch.cat([first.out, second.out], 2), whole.out, 1e-5)
        close(second.state, whole.state, 1e-5)


def test_non_causal_linear_attention_runs_on_the_torch_backend_and_triton_says_why_not() -> None:
    with registered(BY_NAME["linear"]):
        x = inputs("linear", 1, 2, 2, 9, 4)
        choice = attnlab.explain(x["q"], x["k"], x["v"], method="linear", causal=False)
        assert choice.backend is not None and choice.backend.name == "torch_chunk"
        forced = attnlab.explain(x["q"], x["k"], x["v"], method="linear", causal=False, backend="triton")
        assert forced.backend is None and "does not run the noncausal_self pattern" in str(forced)
        res = _call("linear", x, causal=False, backend=None)
        ref, _ = _reference("linear", x, causal=False)
        close(res.out, ref, 1e-5)


@pytest.mark.parametrize("name", ["gla", "gated_delta"])
def test_prefill_checks_gates_after_launching_its_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton prefill (many tokens) starts the gate check (the min / max reductions) before its kernels
    and judges it after them (``start_gate_check``: on a GPU the values come by an asynchronous copy, so
    the kernels are not held behind a host synchronisation): a bad gate is still refused with the detailed
    error, good gates give the result of the check-free call."""
    from attnlab.catalog.linear import _common
    from attnlab.kernels.linear import op as kop

    with registered(BY_NAME[name]):
        x = inputs(name, 1, 2, 2, 40, 16)
        log: list[str] = []
        monkeypatch.setattr(_common.torch, "aminmax", _counting(torch.aminmax, log, "reduce"))
        kernel = "delta_chunk" if name == "gated_delta" else "gla_chunk"
        monkeypatch.setattr(kop, kernel, _counting(getattr(kop, kernel), log, "kernel"))
        monkeypatch.setattr(_common, "check_log_decay", _counting(_common.check_log_decay, log, "judge"))
        got = _call(name, x, backend="triton", chunk=16)
        assert log[-1] == "kernel" and "reduce" in log and log.index("reduce") < log.index("kernel"), log
        monkeypatch.setattr(attnlab.settings, "check_values", False)
        want = _call(name, x, backend="triton", chunk=16)
        torch.testing.assert_close(got.out, want.out)
        monkeypatch.setattr(attnlab.settings, "check_values", True)
        log.clear()
        g = x["g"].clone()
        g[0, 1, 30, 2] = 0.5
        with pytest.raises(InputError, match="g holds 1 positive"):
            _call(name, dict(x, g=g), backend="triton", chunk=16)
        assert log.index("reduce") < log.index("kernel") < log.index("judge"), log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H100)")
def test_prefill_gate_check_does_not_block_the_host_on_cuda() -> None:
    """On a GPU the prefill's gate check makes no blocking device-to-host read before its kernels (sync
    debug mode "error" raises on one) and still refuses a bad gate."""
    from attnlab.catalog.linear import _common

    finish = _common.start_gate_check("gla", g=-torch.rand(2, 3, device="cuda"))
    assert finish is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        finish = _common.start_gate_check("gla", g=-torch.rand(4, 5, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert finish is not None
    finish()
    bad = -torch.rand(4, 5, device="cuda")
    bad[1, 2] = float("nan")
    finish = _common.start_gate_check("gla", g=bad)
    assert finish is not None
    with pytest.raises(InputError, match="g holds 1 NaN"):
        finish()


def test_normalised_linear_in_float16_stays_finite_over_long_prompts() -> None:
    """The default (normalised) linear attention in float16 over 1K tokens and a decode step after a long
    state: finite and at the reference (the Triton chunk op's unnormalised float16 numerator overflowed, so
    that backend refuses this case and torch_chunk, which divides in float32, runs it)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1024, 32, generator=g).half() for _ in range(2))
    v = (1 + torch.randn(1, 1, 1024, 32, generator=g)).half()
    res = attnlab.attention(q, k, v, method="linear", causal=True, chunk=16)
    ref = attnlab.attention(q, k, v, method="linear", causal=True, chunk=16, backend="reference")
    assert torch.isfinite(res.out).all()
    torch.testing.assert_close(res.out.float(), ref.out.float(), atol=2e-2, rtol=2e-2)
    step = attnlab.attention(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], method="linear", causal=True, chunk=16,
                             state=res.state)  # fmt: skip
    assert torch.isfinite(step.out).all()
    choice = attnlab.explain(q, k, v, method="linear", causal=True, chunk=16, backend="triton")
    assert choice.backend is None and "overflows float16" in choice.explain()


def test_check_finite_scans_the_state_too() -> None:
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    g = -torch.rand(1, 2, 8, 16)
    state = torch.full((1, 2, 16, 16), float("nan"))
    with pytest.raises(InputError, match="state"):
        attnlab.attention(q, k, v, method="gla", causal=True, g=g, state=state, check_finite=True)


def test_float16_normalize_refusal_is_by_design_and_left_out_of_parity_cases() -> None:
    """The Triton backend's float16 + normalize refusal is declared by parameters and dtype alone
    (``dtype_refusals``): the parity cases (CUDA and CPU sets) leave that (backend, parameters, dtype) out
    instead of counting a refusal on CUDA as a failure, and keep bfloat16 and unnormalised float16."""
    from attnlab.testing import parity_cases

    spec = attnlab.get("linear")
    triton = spec.backend("triton")
    normalised, plain = spec.make_params({"normalize": True}), spec.make_params({"normalize": False})
    assert triton.dtype_refusals(normalised, torch.float16)
    assert not triton.dtype_refusals(normalised, torch.bfloat16)
    assert not triton.dtype_refusals(plain, torch.float16)
    assert not spec.backend("torch_chunk").dtype_refusals(normalised, torch.float16)
    for cuda in (True, False):
        cases = [c for m, b, c in parity_cases(cuda) if m == "linear" and b == "triton"]
        assert cases
        assert not [c for c in cases if c.dtype == torch.float16 and spec.make_params(c.params).normalize]
        if cuda:
            assert [c for c in cases if c.dtype == torch.bfloat16 and spec.make_params(c.params).normalize]
            assert [c for c in cases if c.dtype == torch.float16]
