"""Extreme gates on the linear family's chunked backends, the Triton backend's backward-tile decision for
``linear``'s learned maps, and the reference's check of their weights.

- Log-gates so negative that their chunk-local cumsum overflows float32 (float32's min; a float64 gate
  below float32's range; lightning's float64 decay of 1e-300) are floored at ``naive.GATE_FLOOR`` on
  every chunked path: output, state and every gradient finite and equal to the token-by-token
  recurrence's (torch_chunk, and Triton under the interpreter on a CPU), prefill and decode.
- ``linear``'s Triton backward holds a (K, V) state tile whose K is the features' width (2F for
  hedgehog, F the maps' output size, known only from their weights): the runner decides on it, not the
  refusal on D.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.catalog.linear import linear
from attnlab.core import Call, Problem, Result
from attnlab.errors import InputError
from attnlab.kernels.linear.naive import GATE_FLOOR, floor_gate
from attnlab.testing import device_under_test

DEV = device_under_test()
F32_MIN = torch.finfo(torch.float32).min

#: (value, dtype) of the extreme gates: float32's min (its cumsum is -inf), a float64 gate below float32's
#: range (-inf in float32), and -1e30 (finite sums that erase the small gates after it, without the floor)
EXTREMES = [(F32_MIN, torch.float32), (-1e300, torch.float64), (-1e30, torch.float32)]


def close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    """Finite, and |a - b| <= tol * (1 + max|b|) everywhere."""
    a, b = a.detach().double(), b.detach().double()
    assert bool(torch.isfinite(a).all()), f"{what}: not finite"
    err = float((a - b).abs().max()) if a.numel() else 0.0
    peak = float(b.abs().max()) if b.numel() else 0.0
    assert err <= tol * (1 + peak), f"{what}: max error {err:.3e} > {tol:.0e} x (1 + max {peak:.3e})"


def _gates(shape: tuple[int, ...], value: float, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Realistic log-decays with ``value`` at every fifth token and at a run of 7 tokens (several in one
    chunk of 16: the cumsum passes the floor more than once)."""
    g = F.logsigmoid(torch.randn(shape, generator=gen) + 2.0).to(dtype)
    g[:, :, 3::5] = value
    g[:, :, 20:27] = value
    return g


def _run(
    method: str, backend: str, x: dict[str, Tensor], s0: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(out, state, the gradient of every input and of the initial state) of a weighted loss over the
    output and the final state."""
    leaves = {n: t.clone().to(DEV).requires_grad_(True) for n, t in x.items()}
    state = s0.clone().to(DEV).requires_grad_(True)
    extra = {n: t for n, t in leaves.items() if n not in "qkv"}
    res = attnlab.attention(
        leaves["q"], leaves["k"], leaves["v"], method=method, causal=True, backend=backend, state=state,
        **params, **extra,
    )  # fmt: skip
    assert isinstance(res, Result)
    gen = torch.Generator().manual_seed(5)
    w_out = torch.randn(res.out.shape, generator=gen).to(DEV)
    w_state = torch.randn(res.state.shape, generator=gen).to(DEV)
    loss = (res.out.float() * w_out).sum() + (res.state * w_state).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names] + [state])
    return res.out, res.state, dict(zip([*names, "state"], grads, strict=True))


CASES = [
    (method, gshape, value, dtype, backend)
    for method, gshape in (("gla", "channel"), ("gated_delta", "channel"), ("gated_delta", "head"))
    for value, dtype in EXTREMES
    for backend in ("torch_chunk", "triton")
]


@pytest.mark.parametrize(
    ("method", "gshape", "value", "dtype", "backend"),
    CASES,
    ids=[f"{m}-{s}-{v:.0e}-{str(d)[6:]}-{b}" for m, s, v, d, b in CASES],
)
def test_extreme_gates_give_the_recurrence_output_state_and_gradients(
    method: str, gshape: str, value: float, dtype: torch.dtype, backend: str
) -> None:
    """Before the floor: NaN everywhere (G_i - G_j = -inf - (-inf)) for float32's min and the float64
    gate; wrong decays after the -1e30 gates (their sum swallows the small gates after them). The
    gradients' tolerance is wider: after 9 floored gates in a chunk the cumsum is near -1152, where a
    float32 ulp is 1.2e-4 (the same rounding as 9 finite gates of -128)."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 2, 40, 8
    x = {name: torch.randn(b, h, n, d, generator=gen) for name in ("q", "k", "v")}
    x["g"] = _gates((b, h, n, d if gshape == "channel" else 1), value, dtype, gen)
    if method == "gated_delta":
        x["beta"] = torch.rand(b, h, n, generator=gen)
    s0 = 0.3 * torch.randn(b, h, d, d, generator=gen)
    out, state, grads = _run(method, backend, x, s0, {"chunk": 16})
    ref_out, ref_state, ref_grads = _run(method, "reference", x, s0, {})
    close(out, ref_out, 5e-5, "out")
    close(state, ref_state, 5e-5, "state")
    for name, want in ref_grads.items():
        close(grads[name], want, 3e-4, f"d{name}")
        assert grads[name].dtype == want.dtype, name
    # the reference's gradient at a gate whose decay is 0 in float32 is 0; the floor's too (up to rounding)
    floored = x["g"].to(DEV).float() < GATE_FLOOR
    assert float(ref_grads["g"].double().abs()[floored].max()) == 0.0
    assert float(grads["g"].double().abs()[floored].max()) <= 1e-5 * (1 + float(ref_grads["g"].abs().max()))


@pytest.mark.parametrize("backend", ["torch_chunk", "triton"])
@pytest.mark.parametrize("decay_dtype", [torch.float64, torch.float32])
def test_lightning_extreme_decays_give_the_recurrence(backend: str, decay_dtype: torch.dtype) -> None:
    """A float64 decay of 1e-300 is in (0, 1], but 0 in float32: its log was -inf (NaN on the chunked
    backends, forward and backward). The log is now taken in float64 and floored; float32's smallest
    normal decay works as before."""
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 1, 3, 40, 8
    x = {name: torch.randn(b, h, n, d, generator=gen) for name in ("q", "k", "v")}
    tiny = 1e-300 if decay_dtype == torch.float64 else float(torch.finfo(torch.float32).tiny)
    x["decay"] = torch.tensor([tiny, 0.5, 0.9], dtype=decay_dtype)
    s0 = 0.3 * torch.randn(b, h, d, d, generator=gen)
    out, state, grads = _run("lightning", backend, x, s0, {"chunk": 16})
    ref_out, ref_state, ref_grads = _run("lightning", "reference", x, s0, {})
    close(out, ref_out, 5e-5, "out")
    close(state, ref_state, 5e-5, "state")
    for name in ("q", "k", "v", "state"):
        close(grads[name], ref_grads[name], 5e-5, f"d{name}")
    # (the decay's gradient is dL/dlog(decay) / decay: rounding amplified by 1 / decay at the tiny one)
    close(grads["decay"][1:], ref_grads["decay"][1:], 5e-5, "ddecay")
    if decay_dtype == torch.float64:
        assert float(grads["decay"][0]) == float(ref_grads["decay"][0]) == 0.0


DECODE = [
    (method, gshape, value, dtype, backend)
    for method, gshape in (("gla", "channel"), ("gated_delta", "channel"), ("gated_delta", "head"))
    for value, dtype in EXTREMES[:2]
    for backend in ("torch_chunk", "triton")
]


@pytest.mark.parametrize(
    ("method", "gshape", "value", "dtype", "backend"),
    DECODE,
    ids=[f"{m}-{s}-{v:.0e}-{str(d)[6:]}-{b}" for m, s, v, d, b in DECODE],
)
def test_decode_with_extreme_gates_gives_the_recurrence(
    method: str, gshape: str, value: float, dtype: torch.dtype, backend: str
) -> None:
    """A few tokens without gradients from a carried state: torch_chunk's chunked form gave NaN; the
    Triton step kernel counted a float64 gate below float32's range as -inf (out of range) and raised,
    although the gate check passes it."""
    gen = torch.Generator().manual_seed(2)
    b, h, n, d = 1, 2, 3, 8
    x = {name: torch.randn(b, h, n, d, generator=gen).to(DEV) for name in ("q", "k", "v")}
    g = F.logsigmoid(torch.randn(b, h, n, d if gshape == "channel" else 1, generator=gen)).to(dtype)
    g[:, :, 1] = value
    extra = {"g": g.to(DEV)}
    if method == "gated_delta":
        extra["beta"] = torch.rand(b, h, n, generator=gen).to(DEV)
    s0 = torch.randn(b, h, d, d, generator=gen).to(DEV)
    got = attnlab.attention(x["q"], x["k"], x["v"], method=method, causal=True, backend=backend, state=s0,
                            **extra)  # fmt: skip
    want = attnlab.attention(x["q"], x["k"], x["v"], method=method, causal=True, backend="reference",
                             state=s0, **extra)  # fmt: skip
    assert isinstance(got, Result) and isinstance(want, Result)
    close(got.out, want.out, 1e-5, "out")
    close(got.state, want.state, 1e-5, "state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_cumsums_floor_the_gates(dtype: torch.dtype) -> None:
    """The chunk-local cumsums (Triton's one launch, PyTorch's per channel and per token) floor each gate
    at ``GATE_FLOOR`` in float32 first: finite however negative g is, and equal to each other."""
    from attnlab.kernels.linear import op

    g = torch.full((1, 2, 20, 4), -0.25, dtype=dtype)
    g[:, :, ::3] = -float(torch.finfo(dtype).max)
    if dtype == torch.float64:
        g[:, :, 1] = -1e300
    g = g.to(DEV)
    assert torch.equal(floor_gate(g), g.float().clamp(min=GATE_FLOOR))
    want = op.chunk_cumsum(g, 1, 2, 20, 4, 16, g.device)
    want1 = op.chunk_cumsum_scalar(g[..., 0], 1, 2, 20, 16, g.device)
    assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(want1).all())
    assert float(want.min()) >= 16 * GATE_FLOOR
    ref = F.pad(floor_gate(g), (0, 0, 0, 12)).view(1, 2, 2, 16, 4).cumsum(3).view(1, 2, 32, 4)
    torch.testing.assert_close(want, ref)
    torch.testing.assert_close(want1, ref[..., 0])
    torch.testing.assert_close(op.gate_cumsum(g, 16), want)
    torch.testing.assert_close(op.gate_cumsum(g[..., 0], 16), want1)


# -- linear: the Triton backward's state tile, decided on the features' real width --


def _problem(d: int, v_dim: int, dtype: torch.dtype) -> Problem:
    return Problem(1, 1, 1, 20, 20, d, v_dim, True, dtype, torch.device("cuda"), True)


def test_the_backward_tile_is_decided_on_the_features_width_not_d() -> None:
    """fp32, D_v = 128: the scalar-gate backward fits a 128 x 64 tile (an H100's shared memory), not
    128 x 128. Hedgehog maps (32, 64) give K = 2F = 128 features of D = 32: the backward must not run
    (it needs 278528 B of shared memory); relu maps (128, 16) give K = 16 of D = 128: it fits. The
    refusal (which sees D, not the maps) refused the second and passed the first; now it says nothing of
    the backward, and the runner's decision takes K."""
    hedgehog = linear.LinearParams(feature_map="hedgehog", chunk=16)
    relu = linear.LinearParams(feature_map="relu", normalize=False, chunk=16)
    big = linear.backward_fallback(linear.feature_dim(hedgehog, 64), 128, torch.float32, True)
    assert big and "128 x 128 state tile" in big[0], big
    assert linear.backward_fallback(linear.feature_dim(relu, 16), 128, torch.float32, True) == []
    assert linear.backward_fallback(128, 128, torch.float32, False) == []  # (no backward)
    assert linear.backward_fallback(128, 128, torch.bfloat16, True) == []  # (16-bit: 128 x 128 fits)
    # past K_SLICE features the kernels run on slices: the tile is a slice's
    assert linear.backward_fallback(512, 64, torch.float32, True) == []
    # the refusal does not decide on D: D = 128 (whose relu maps may give 16 features) is not refused
    call = Call(linear.SPEC, relu, _problem(128, 128, torch.float32), 1.0)
    assert linear._triton_refusal(call) == []
    call = Call(linear.SPEC, hedgehog, _problem(32, 128, torch.float32), 1.0)
    assert linear._triton_refusal(call) == []


def _linear_inputs(d: int, f: int, v_dim: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(1, 1, 20, d, generator=gen),
        "k": torch.randn(1, 1, 20, d, generator=gen),
        "v": torch.randn(1, 1, 20, v_dim, generator=gen),
        "map_q": linear.sample_map((1, d, f), gen),
        "map_k": linear.sample_map((1, d, f), gen),
    }


@pytest.mark.parametrize(
    ("feature_map", "d", "f", "triton_runs"), [("hedgehog", 32, 64, False), ("relu", 64, 8, True)]
)
def test_the_linear_triton_runner_falls_back_when_the_tile_does_not_fit(
    feature_map: str, d: int, f: int, triton_runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradients in fp32 at D_v = 128, the Triton backend runs the kernels when the features' tile
    fits (relu maps to F = 8 of D = 64) and torch_chunk's path when it does not (hedgehog's 2F = 128 of
    D = 32: the GPU would raise OutOfResources): the same results as the reference either way."""
    from attnlab.kernels.linear import op

    launched: list[int] = []
    real = op.gla_chunk

    def counted(*args: Any, **kwargs: Any) -> Any:
        launched.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "gla_chunk", counted)
    x = _linear_inputs(d, f, 128, seed=4)
    params = {"feature_map": feature_map, "normalize": False}
    a = {n: t.clone().to(DEV).requires_grad_(True) for n, t in x.items()}
    b = {n: t.clone().to(DEV).requires_grad_(True) for n, t in x.items()}
    got = attnlab.attention(a["q"], a["k"], a["v"], method="linear", causal=True, backend="triton", chunk=16,
                            map_q=a["map_q"], map_k=a["map_k"], **params)  # fmt: skip
    want = attnlab.attention(b["q"], b["k"], b["v"], method="linear", causal=True, backend="reference",
                             map_q=b["map_q"], map_k=b["map_k"], **params)  # fmt: skip
    assert isinstance(got, Result) and isinstance(want, Result)
    assert bool(launched) == triton_runs
    close(got.out, want.out, 2e-5, "out")
    close(got.state, want.state, 2e-5, "state")
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(got.out.shape, generator=gen).to(DEV)
    ga = torch.autograd.grad((got.out * w).sum() + got.state.sum(), list(a.values()))
    gb = torch.autograd.grad((want.out * w).sum() + want.state.sum(), list(b.values()))
    for name, u, t in zip(a, ga, gb, strict=True):
        close(u, t, 5e-5, f"d{name}")
    # without gradients the forward runs on Triton whatever the tile (no backward to hold it)
    launched.clear()
    with torch.no_grad():
        fwd = attnlab.attention(x["q"].to(DEV), x["k"].to(DEV), x["v"].to(DEV), method="linear", causal=True,
                                backend="triton", chunk=16, map_q=x["map_q"].to(DEV),
                                map_k=x["map_k"].to(DEV), **params)  # fmt: skip
    assert launched and isinstance(fwd, Result)
    close(fwd.out, want.out, 2e-5, "out without gradients")


def test_the_linear_reference_refuses_nan_map_weights_as_the_backends_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NaN in a learned map's weights: refused by every backend, the reference included (it returned
    NaN); with ``settings.check_values`` off, by none."""
    x = {n: t.to(DEV) for n, t in _linear_inputs(8, 8, 8, seed=7).items()}
    x["map_q"][0, 1, 2] = float("nan")
    for backend in ("reference", "torch_chunk", "triton"):
        with pytest.raises(InputError, match="map_q holds 1 NaN/Inf value"):
            attnlab.attention(x["q"], x["k"], x["v"], method="linear", causal=True, backend=backend,
                              feature_map="hedgehog", chunk=16, map_q=x["map_q"], map_k=x["map_k"])  # fmt: skip
    monkeypatch.setattr(attnlab.settings, "check_values", False)
    out = attnlab.attention(x["q"], x["k"], x["v"], method="linear", causal=True, backend="reference",
                            feature_map="hedgehog", map_q=x["map_q"], map_k=x["map_k"])  # fmt: skip
    assert isinstance(out, Result) and bool(torch.isnan(out.out).any())
