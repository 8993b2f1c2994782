"""``linear`` with learned feature maps (Hedgehog's [softmax(xW), softmax(-xW)], T2R-style relu(xW)): the
reference against the map's definition written out independently (the quadratic form), the chunked
backends (PyTorch, Triton under the interpreter on a CPU) against the reference for the output, the state
and every gradient (the map's weights included), a state carried across calls, and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.catalog.linear import linear
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.testing import device_under_test

DEV = device_under_test()


def _inputs(
    b: int, h: int, hk: int, n: int, d: int, seed: int = 0, f: int | None = None
) -> dict[str, Tensor]:
    """q, k, v and the maps' weights (H, D, F), F = D unless given."""
    g = torch.Generator().manual_seed(seed)
    f = d if f is None else f
    x = {
        "q": torch.randn(b, h, n, d, generator=g),
        "k": torch.randn(b, hk, n, d, generator=g),
        "v": torch.randn(b, hk, n, d, generator=g),
        "map_q": linear.sample_map((h, d, f), g),
        "map_k": linear.sample_map((h, d, f), g),
    }
    return {name: t.to(DEV) for name, t in x.items()}


def _hedgehog_by_hand(x: Tensor, w: Tensor) -> Tensor:
    """[softmax(x W), softmax(-x W)] per token, written out with exp and sums (float64)."""
    y = torch.einsum("bhnd,hdf->bhnf", x.double(), w.double())
    pos, neg = torch.exp(y - y.amax(-1, keepdim=True)), torch.exp(-y - (-y).amax(-1, keepdim=True))
    return torch.cat([pos / pos.sum(-1, keepdim=True), neg / neg.sum(-1, keepdim=True)], -1)


def _close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max())
    peak = float(b.abs().max())
    assert err <= tol * (1 + peak), f"{what}: max error {err:.3e} > {tol:.0e} x (1 + {peak:.3e})"


@pytest.mark.parametrize(("normalize", "f"), [(True, 8), (False, 8), (True, 4)])
def test_hedgehog_reference_is_the_quadratic_form_of_its_feature_map(normalize: bool, f: int) -> None:
    """o_i = sum_{j<=i} (phi(q_i) . phi(k_j)) v_j, divided by sum_{j<=i} phi(q_i) . phi(k_j) when normalised
    (scale otherwise); the state is sum_j phi(k_j) v_j^T, (B, H, 2F, D_v), and z = sum_j phi(k_j); F = D
    or a map to fewer features (F = 4 of D = 8)."""
    x = _inputs(1, 4, 2, 23, 8, f=f)
    fq = _hedgehog_by_hand(x["q"], x["map_q"])
    fk = _hedgehog_by_hand(x["k"].repeat_interleave(2, 1), x["map_k"])
    v = x["v"].repeat_interleave(2, 1).double()
    a = torch.tril(fq @ fk.transpose(-1, -2))
    want = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6) if normalize else 8**-0.5 * (a @ v)
    p = linear.LinearParams(feature_map="hedgehog", normalize=normalize)
    out, state = linear.reference(
        x["q"], x["k"], x["v"], p, causal=True, scale=8**-0.5, map_q=x["map_q"], map_k=x["map_k"]
    )
    _close(out, want, 1e-5, "out")
    s = state[0] if normalize else state
    assert s.shape == (1, 4, 2 * f, 8) and s.dtype == torch.float32
    _close(s, fk.transpose(-1, -2) @ v, 1e-5, "state")
    if normalize:
        _close(state[1], fk.sum(2), 1e-5, "z")
    # each half of a feature vector sums to 1 (a softmax), all features positive
    assert bool((fq > 0).all())
    _close(fq[..., :f].sum(-1), torch.ones_like(fq[..., 0]), 1e-12, "half sums")


def test_hedgehog_without_weights_is_the_identity_initialisation() -> None:
    x = _inputs(1, 2, 2, 9, 4)
    eye = torch.eye(4, device=DEV).expand(2, 4, 4)
    a = attnlab.attention(x["q"], x["k"], x["v"], method="linear", causal=True, feature_map="hedgehog")
    b = attnlab.attention(
        x["q"], x["k"], x["v"], method="linear", causal=True, feature_map="hedgehog", map_q=eye, map_k=eye
    )
    assert isinstance(a, Result) and isinstance(b, Result)
    torch.testing.assert_close(a.out, b.out)


def test_a_learned_projection_before_relu_is_t2r() -> None:
    """With relu, the weights give relu(x W) features (T2R without its bias)."""
    x = _inputs(1, 2, 2, 11, 4)
    res = attnlab.attention(x["q"], x["k"], x["v"], method="linear", causal=True, feature_map="relu",
                            normalize=False, map_q=x["map_q"], map_k=x["map_k"])  # fmt: skip
    assert isinstance(res, Result)
    fq = torch.relu(torch.einsum("bhnd,hdf->bhnf", x["q"], x["map_q"]))
    fk = torch.relu(torch.einsum("bhnd,hdf->bhnf", x["k"], x["map_k"]))
    want = 0.5 * torch.tril(fq @ fk.transpose(-1, -2)) @ x["v"]
    _close(res.out, want, 1e-5, "out")


CASES = [("torch_chunk", 1, 8), ("torch_chunk", 63, 8), ("triton", 63, 8), ("triton", 40, 16)]


@pytest.mark.parametrize(("backend", "n", "f"), CASES, ids=[f"{b}-N{n}-F{f}" for b, n, f in CASES])
def test_hedgehog_backends_match_the_reference_with_every_gradient(backend: str, n: int, f: int) -> None:
    """Output, (S, z) and the gradients of q, k, v, both weights and the initial state, GQA (H=4, H_kv=2),
    a non-zero start state, chunk 16 (several chunks and a partial one at N=63); maps to F = D = 8 or to
    F = 16 features (32 state rows)."""
    x = _inputs(1, 4, 2, n, 8, f=f)
    p = linear.LinearParams(feature_map="hedgehog")
    y = _inputs(1, 4, 2, 5, 8, seed=1, f=f)  # a non-zero start state
    s0 = linear.reference(y["q"], y["k"], y["v"], p, causal=True, scale=8**-0.5, map_q=y["map_q"],
                          map_k=y["map_k"])[1]  # fmt: skip
    xa = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    xb = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    sa = [t.clone().requires_grad_(True) for t in s0]
    sb = [t.clone().requires_grad_(True) for t in s0]
    op = attnlab.prepare("linear", causal=True, backend=backend, feature_map="hedgehog", chunk=16)
    res = op(xa["q"], xa["k"], xa["v"], state=tuple(sa), map_q=xa["map_q"], map_k=xa["map_k"])
    assert isinstance(res, Result)
    ref_out, ref_state = linear.reference(xb["q"], xb["k"], xb["v"], p, causal=True, scale=8**-0.5,
                                          state=tuple(sb), map_q=xb["map_q"], map_k=xb["map_k"])  # fmt: skip
    _close(res.out, ref_out, 2e-5, "out")
    for a, b, name in zip(res.state, ref_state, ("S", "z"), strict=True):
        assert a.shape == b.shape
        _close(a, b, 2e-5, name)
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(res.out.shape, generator=gen).to(DEV)
    ds = [torch.randn(t.shape, generator=gen).to(DEV) for t in res.state]

    def loss(out: Tensor, state: Any) -> Tensor:
        return (out * dout).sum() + sum((s * d).sum() for s, d in zip(state, ds, strict=True))

    names = list(x)
    got = torch.autograd.grad(loss(res.out, res.state), [xa[k] for k in names] + sa)
    want = torch.autograd.grad(loss(ref_out, ref_state), [xb[k] for k in names] + sb)
    for name, a, b in zip([*names, "S0", "z0"], got, want, strict=True):
        _close(a, b, 5e-5, f"d{name}")


@pytest.mark.parametrize("backend", ["torch_chunk", "triton"])
def test_a_hedgehog_state_carried_across_calls_equals_one_pass(backend: str) -> None:
    x = _inputs(1, 2, 2, 40, 8)
    w = {"map_q": x["map_q"], "map_k": x["map_k"]}
    op = attnlab.prepare("linear", causal=True, backend=backend, feature_map="hedgehog", chunk=16)

    def part(a: int, b: int, state: Any = None) -> Result:
        r = op(x["q"][:, :, a:b], x["k"][:, :, a:b], x["v"][:, :, a:b], state=state, **w)
        assert isinstance(r, Result)
        return r

    whole, first = part(0, 40), part(0, 17)
    second = part(17, 39, first.state)
    step = part(39, 40, second.state)  # one-token decode (the Triton backend's step kernel)
    _close(torch.cat([first.out, second.out, step.out], 2), whole.out, 1e-5, "out")
    for a, b in zip(step.state, whole.state, strict=True):
        _close(a, b, 1e-5, "state")


def test_hedgehog_bad_input_is_refused_naming_what_was_given() -> None:
    x = _inputs(1, 2, 2, 9, 4)
    q, k, v = x["q"], x["k"], x["v"]
    with pytest.raises(InputError, match=r"map_q"):
        attnlab.attention(q, k, v, method="linear", feature_map="hedgehog", map_q=x["map_q"][:, :, :2])
    with pytest.raises(InputError, match=r"map_k"):
        attnlab.attention(q, k, v, method="linear", feature_map="hedgehog", map_k=x["map_k"][:1])
    with pytest.raises(InputError, match=r"map_q"):
        attnlab.attention(q, k, v, method="linear", feature_map="hedgehog", map_q=x["map_q"].long())
    bad = x["map_k"].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"map_k"):
        attnlab.attention(q, k, v, method="linear", feature_map="hedgehog", map_k=bad)
    # a state of the elu map's size (D rows) where the hedgehog map needs 2D
    elu = attnlab.attention(q, k, v, method="linear", causal=True)
    assert isinstance(elu, Result)
    with pytest.raises(InputError, match=r"\(1, 2, 8, 4\)"):
        attnlab.attention(q, k, v, method="linear", causal=True, feature_map="hedgehog", state=elu.state)
    # F fixed by map_q, another F in map_k; one weight mapping to F != D without the other
    with pytest.raises(InputError, match=r"map_k has shape \(2, 4, 3\).*free sizes fixed by map_q"):
        attnlab.attention(q, k, v, method="linear", feature_map="hedgehog", map_q=x["map_q"][..., :2],
                          map_k=x["map_k"][..., :3])  # fmt: skip
    with pytest.raises(InputError, match=r"map_q maps D=4 to F=2 features but map_k is absent"):
        attnlab.attention(
            q, k, v, method="linear", causal=True, feature_map="hedgehog", map_q=x["map_q"][..., :2]
        )
    with pytest.raises(ParamError, match="feature_map='softmax' is invalid"):
        attnlab.attention(q, k, v, method="linear", feature_map="softmax")


@pytest.mark.parametrize("backend", ["triton"])
def test_feature_slices_sum_to_the_whole_map(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``K_SLICE`` features the Triton path runs the kernels on feature slices and sums them (the
    H100 refuses a 256-feature chunk kernel for shared memory): forced here with slices of 4 of 16
    features, output, (S, z) and gradients equal the reference's."""
    monkeypatch.setattr(linear, "K_SLICE", 4)
    x = _inputs(1, 2, 2, 37, 8)
    xa = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    xb = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    op = attnlab.prepare("linear", causal=True, backend=backend, feature_map="hedgehog", chunk=16)
    res = op(xa["q"], xa["k"], xa["v"], map_q=xa["map_q"], map_k=xa["map_k"])
    assert isinstance(res, Result)
    p = linear.LinearParams(feature_map="hedgehog")
    ref, ref_state = linear.reference(xb["q"], xb["k"], xb["v"], p, causal=True, scale=8**-0.5,
                                      map_q=xb["map_q"], map_k=xb["map_k"])  # fmt: skip
    _close(res.out, ref, 2e-5, "out")
    for a, b in zip(res.state, ref_state, strict=True):
        _close(a, b, 2e-5, "state")
    got = torch.autograd.grad(res.out.sum(), list(xa.values()))
    want = torch.autograd.grad(ref.sum(), list(xb.values()))
    for name, a, b in zip(xa, got, want, strict=True):
        _close(a, b, 5e-5, f"d{name}")
