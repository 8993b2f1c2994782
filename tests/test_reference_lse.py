"""The softmax variants' log-sum-exp on the ``reference`` backend (``MethodSpec.reference_lse``, set from each
variant's ``reference_lse``) and the parity harness's lse check against it, the tensor inputs passed through.

1. ``backend="reference", return_lse=True`` returns the method's own lse (transformed logits, a sink's term),
   equal to ``LSE_REFERENCES[name]``, the tensor inputs (slopes, bias, sinks, temperature, gate, u/vf) taken;
   rows with no key -inf (sink: ``s_h``). softplus and affine_scaled (no lse) stay refused.
2. :func:`attnlab.testing.check_parity` compares the lse of every variant backend that declares one
   (eager, the Triton kernel in the interpreter; Flex on a GPU: compiled CPU FlexAttention cannot return
   an lse) with that reference, at small shapes with the optional tensor inputs, and fails a wrong one
   (plain softmax's, tensor inputs ignored, a keyless row not -inf).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.catalog.variants import LSE_REFERENCES, SPECS
from attnlab.core import Result
from attnlab.errors import BackendError
from attnlab.registry import methods
from attnlab.testing import Case, check_parity, device_under_test, on_cuda

DEVICE = device_under_test()
B, H, H_KV, D = 2, 4, 2, 16
LSE_NAMES = sorted(LSE_REFERENCES)


def _inputs(name: str, n_q: int, n_k: int, g: torch.Generator) -> dict[str, Tensor]:
    """Tensor inputs that make each method's transform bite (on DEVICE): a sink of -inf on one head (its
    keyless rows' lse -inf), a bias with a fully masked row, broadcast dims."""
    if name == "alibi":
        t = {"slopes": 0.25 + torch.rand(H, generator=g)}
    elif name == "bias":
        bias = torch.randn(B, 1, n_q, n_k, generator=g)
        bias[:, :, 1] = float("-inf")  # every key of row 1 masked: lse -inf there
        bias[:, :, 2, ::2] = float("-inf")
        t = {"bias": bias}
    elif name == "sink":
        t = {"sinks": torch.tensor([0.5, float("-inf"), -2.0, 1.0])}
    elif name == "selective":
        t = {"temperature": 0.25 + torch.rand(B, H, n_q, generator=g)}
    elif name == "gated":
        t = {"gate": torch.randn(B, H, n_q, 1, generator=g)}
    elif name == "lowrank_bias":
        t = {"u": torch.randn(B, 1, n_q, 3, generator=g), "vf": torch.randn(1, H, n_k, 3, generator=g)}
    else:
        t = {}
    return {n: x.to(DEVICE) for n, x in t.items()}


def _param_sets(name: str) -> list[dict[str, Any]]:
    return [dict(p) for p in attnlab.get(name).test_params]


def test_each_variant_spec_carries_its_reference_lse() -> None:
    """The hook is the module's ``reference_lse`` for each method with an lse, and absent for the others
    (softplus, affine_scaled) and for every method outside the variants."""
    for spec in SPECS:
        assert spec.reference_lse is LSE_REFERENCES.get(spec.name), spec.name
    variants = {spec.name for spec in SPECS}
    for name, spec in methods().items():
        if name not in variants:
            assert spec.reference_lse is None, name


@pytest.mark.parametrize("name", LSE_NAMES)
@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(9, 13, False), (17, 13, True), (13, 13, True)])
def test_reference_backend_returns_the_variants_own_lse(name: str, n_q: int, n_k: int, causal: bool) -> None:
    """``backend="reference", return_lse=True`` gives exactly ``LSE_REFERENCES[name]`` (out and lse, float32
    (B, H, N_q)) for every parameter set, with and without the tensor inputs; -inf where the method's
    normaliser is empty (17 x 13 causal: 4 keyless rows; sink: ``s_h`` there, -inf on the -inf sink's
    head)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, n_q, D, generator=g).to(DEVICE) * 2
    k = torch.randn(B, H_KV, n_k, D, generator=g).to(DEVICE) * 2
    v = torch.randn(B, H_KV, n_k, D, generator=g).to(DEVICE)
    spec = attnlab.get(name)
    extra = _inputs(name, n_q, n_k, g)
    given = [extra] if spec.name == "lowrank_bias" else [{}, extra]  # (its factors are required)
    for params in _param_sets(name):
        for inputs in given:
            res = attnlab.attention(q, k, v, method=name, causal=causal, backend="reference", return_lse=True,
                                    **params, **inputs)  # fmt: skip
            assert isinstance(res, Result) and res.lse is not None
            want_out, want_lse = LSE_REFERENCES[name](q, k, v, spec.make_params(params), causal=causal,
                                                      scale=D**-0.5, **inputs)  # fmt: skip
            label = f"{name} {params} {sorted(inputs)}"
            assert res.lse.dtype == torch.float32 and res.lse.shape == (B, H, n_q), label
            torch.testing.assert_close(res.out, want_out, atol=0, rtol=0, msg=lambda m, x=label: f"{x}: {m}")
            torch.testing.assert_close(res.lse, want_lse, atol=0, rtol=0, msg=lambda m, x=label: f"{x}: {m}")
            if causal and n_q > n_k:  # the keyless rows
                keyless = res.lse[:, :, : n_q - n_k]
                if name == "sink":
                    sinks = inputs.get(
                        "sinks", torch.full((H,), float(params.get("logit", 0.0)), device=DEVICE)
                    )
                    torch.testing.assert_close(keyless, sinks.float()[None, :, None].expand_as(keyless))
                else:
                    assert torch.isneginf(keyless).all(), label
            if name == "bias" and inputs:  # the row whose bias masks every key
                assert torch.isneginf(res.lse[:, :, 1]).all(), label


def test_reference_lse_is_not_the_plain_softmax_lse() -> None:
    """The reference's lse is the method's normaliser, not ``logsumexp(scale q . k)``: a soft cap of 0.5
    bounds every logit by 0.5, so the lse is at most ``0.5 + log N_k``."""
    q, k, v = torch.randn(1, H, 9, D) * 4, torch.randn(1, H_KV, 9, D) * 4, torch.randn(1, H_KV, 9, D)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    res = attnlab.attention(q, k, v, method="softcap", cap=0.5, backend="reference", return_lse=True)
    plain = attnlab.attention(q, k, v, method="softmax", backend="reference", return_lse=True)
    assert (
        isinstance(res, Result)
        and res.lse is not None
        and isinstance(plain, Result)
        and plain.lse is not None
    )
    assert bool((res.lse <= 0.5 + torch.log(torch.tensor(9.0)) + 1e-5).all())
    assert float((plain.lse - res.lse).abs().max()) > 1.0


@pytest.mark.parametrize("name", ["softplus", "affine_scaled"])
def test_reference_still_refuses_the_lse_of_a_variant_without_one(name: str) -> None:
    q, k, v = (torch.randn(1, H, 9, D).to(DEVICE) for _ in range(3))
    assert attnlab.get(name).reference_lse is None
    with pytest.raises(BackendError, match="log-sum-exp"):
        attnlab.attention(q, k, v, method=name, backend="reference", return_lse=True)


# -- the parity harness --------------------------------------------------------------------------------------

LSE_BACKENDS = [(name, b.name) for name in LSE_NAMES for b in attnlab.get(name).backends if b.caps.lse]
#: (N_q, N_k, causal): a cross call with keyless rows, a non-causal one, a self-causal one
SHAPES = [(13, 9, True), (9, 13, False), (11, 11, True)]


def _case(name: str, n_q: int, n_k: int, causal: bool, dtype: torch.dtype, optional: bool) -> Case:
    return Case(2, 2, 1, n_q, n_k, 16, dtype, causal, _param_sets(name)[0], optional_inputs=optional)


@pytest.mark.parametrize(("name", "backend"), LSE_BACKENDS, ids=[f"{m}-{b}" for m, b in LSE_BACKENDS])
@pytest.mark.parametrize(("n_q", "n_k", "causal"), SHAPES)
def test_parity_checks_the_lse_of_every_variant_backend(
    name: str, backend: str, n_q: int, n_k: int, causal: bool
) -> None:
    """check_parity compares the backend's lse with the method's reference lse, with and without the
    optional tensor inputs (passed to both), fp32 and bf16 (the interpreted kernel: fp32). Compiled CPU
    FlexAttention cannot return an lse (the backend refuses it there): checked on CUDA."""
    if backend == "flex" and not on_cuda():
        pytest.skip("compiled FlexAttention on CPU cannot return the log-sum-exp (torch 2.13): CUDA only")
    spec = attnlab.get(name)
    dtypes = [torch.float32] if backend == "triton" and not on_cuda() else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for optional in (False, True):
            case = _case(name, n_q, n_k, causal, dtype, optional)
            check = check_parity(spec, backend, case, DEVICE, backward=False)
            assert not check.skipped, check.skipped
            assert "lse" in check.errors, f"{name}/{backend} {case.label()}: the lse was not checked"
            assert check.passed, f"{name}/{backend} {case.label()}: {check.summary()}"


def _fake_lse(monkeypatch: pytest.MonkeyPatch, name: str, change: Any) -> None:
    """The eager backend of ``name`` returns ``change(lse, q, k, v, params, causal, scale, inputs)``."""
    eager = attnlab.get(name).backend("eager")
    real = eager.reference_lse  # type: ignore[attr-defined]

    def fake(q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
             **inputs: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        out, lse = real(q, k, v, params, causal=causal, scale=scale, upcast=upcast, **inputs)
        return out, change(lse, q, k, v, params, causal, scale, inputs)

    monkeypatch.setattr(eager, "reference_lse", fake)


def _plain_lse(lse: Tensor, q: Tensor, k: Tensor, v: Tensor, params: Any, causal: bool, scale: float,
               inputs: dict[str, Tensor]) -> Tensor:  # fmt: skip
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1))
    s = s * scale
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        ok = (
            torch.arange(n_k, device=q.device)[None, :]
            <= torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
        )
        s = s.masked_fill(~ok, float("-inf"))
    return torch.logsumexp(s, -1)


@pytest.mark.parametrize(
    ("name", "optional", "change"),
    [
        ("softcap", False, _plain_lse),  # plain softmax's lse, not the capped logits'
        ("alibi", True, lambda lse, q, k, v, params, causal, scale, inputs:  # the given slopes ignored
            LSE_REFERENCES["alibi"](q, k, v, params, causal=causal, scale=scale)[1]),
        ("sink", True, lambda lse, *rest: lse + 1e-3),  # 1e-3 nats off in fp32
        ("bias", False, lambda lse, *rest: lse.nan_to_num(neginf=0.0)),  # keyless rows not -inf
        ("selective", False, lambda lse, *rest: lse.to(torch.bfloat16)),  # not float32
    ],
    ids=["plain-lse", "inputs-ignored", "off-by-1e-3", "keyless-row-finite", "bf16-lse"],
)  # fmt: skip
def test_parity_fails_a_wrong_lse(
    monkeypatch: pytest.MonkeyPatch, name: str, optional: bool, change: Any
) -> None:
    spec = attnlab.get(name)
    case = Case(2, 2, 1, 13, 9, 16, torch.float32, True, _param_sets(name)[0], optional_inputs=optional)
    assert check_parity(spec, "eager", case, DEVICE, backward=False).passed  # (before the fake)
    _fake_lse(monkeypatch, name, change)
    check = check_parity(spec, "eager", case, DEVICE, backward=False)
    assert not check.passed and ("lse" in check.errors or check.crash), check.summary()
    assert check.errors["out"][0] <= check.errors["out"][1]  # the output is untouched
