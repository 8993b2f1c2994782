"""Every error path of attnlab.attention: bad input gets a clear error naming what was given and expected."""

from __future__ import annotations

import os

import pytest
import torch

import attnlab
from attnlab import (
    BackendError,
    DenseTooLargeError,
    InputError,
    ParamError,
    UnknownMethodError,
    UnsupportedPatternError,
)
from attnlab.testing import random_qkv


def qkv(b=1, h=4, hk=2, n=16, nk=None, d=16, dtype=torch.float32):  # type: ignore[no-untyped-def]
    return random_qkv(b, h, hk, n, n if nk is None else nk, d, dtype, device="cpu")


def test_wrong_rank_names_the_shape_and_the_fix() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match=r"q must have 4 dimensions .* got shape \(4, 16, 16\).*transpose"):
        attnlab.attention(q[0], k, v)


def test_not_a_tensor() -> None:
    q, _k, v = qkv()
    with pytest.raises(InputError, match="k must be a torch.Tensor, got list"):
        attnlab.attention(q, [1, 2], v)  # type: ignore[arg-type]


def test_batch_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match=r"batch sizes differ: q \(1, 4, 16, 16\), k \(2, 2, 16, 16\)"):
        attnlab.attention(q, torch.cat([k, k]), torch.cat([v, v]))


def test_head_dim_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="head dims differ: .* D=16, .* D=8"):
        attnlab.attention(q, k[..., :8], v)


def test_kv_length_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="must have the same heads"):
        attnlab.attention(q, k, v[:, :, :5])


def test_gqa_ratio_must_divide() -> None:
    q, k, v = qkv(h=4, hk=3)
    with pytest.raises(InputError, match=r"q has 4 heads and k/v have 3.*H % H_kv == 0.*1, 2, 4"):
        attnlab.attention(q, k, v)


def test_dtype_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match=r"share one dtype, got q torch.float32, k torch.bfloat16"):
        attnlab.attention(q, k.bfloat16(), v)


def test_unsupported_dtype() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="dtype torch.float64; expected float32, bfloat16 or float16"):
        attnlab.attention(q.double(), k.double(), v.double())


def test_device_mismatch() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="one device, got q on cpu, k on meta"):
        attnlab.attention(q, k.to("meta"), v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_when_the_check_is_on(
    bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = qkv()
    v[0, 0, 3, 1] = bad
    out = attnlab.attention(q, k, v)  # default: no scan, no host synchronisation
    assert out.shape == q.shape
    with pytest.raises(InputError, match=r"v contains 1 NaN/Inf value\(s\).*check_finite=False"):
        attnlab.attention(q, k, v, check_finite=True)
    op = attnlab.prepare("softmax", check_finite=True)
    with pytest.raises(InputError, match=r"v contains 1 NaN/Inf"):
        op(q, k, v)
    monkeypatch.setattr(attnlab.settings, "check_finite", True)  # process-wide debug setting
    with pytest.raises(InputError, match=r"v contains 1 NaN/Inf"):
        attnlab.attention(q, k, v)
    assert attnlab.attention(q, k, v, check_finite=False).shape == q.shape  # a call can still opt out


def test_the_environment_variable_turns_the_check_on() -> None:
    import subprocess
    import sys

    code = (
        "import torch, attnlab\n"
        "q = torch.randn(1, 1, 4, 8); q[0, 0, 0, 0] = float('nan')\n"
        "try:\n    attnlab.attention(q, q, q)\nexcept attnlab.InputError as e:\n    print('refused:', e)\n"
    )
    for value, refused in (("1", True), ("0", False)):
        env = {**__import__("os").environ, "ATTNLAB_CHECK_FINITE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert ("refused: q contains 1 NaN/Inf" in out.stdout) == refused, out.stdout + out.stderr


@pytest.mark.parametrize(("n", "nk"), [(0, 16), (16, 0)])
def test_empty_sequences(n: int, nk: int) -> None:
    q, k, v = qkv(n=n, nk=nk)
    with pytest.raises(InputError, match=f"empty sequence: N_q={n}, N_k={nk}"):
        attnlab.attention(q, k, v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "x"])
def test_bad_scale(scale: object) -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match="scale must be a positive finite number"):
        attnlab.attention(q, k, v, scale=scale)  # type: ignore[arg-type]


def test_causal_must_be_bool() -> None:
    q, k, v = qkv()
    attnlab.attention(q, k, v, causal=True)  # a cached causal op must not answer for causal=1 (1 == True)
    with pytest.raises(InputError, match="causal must be a bool"):
        attnlab.attention(q, k, v, causal=1)  # type: ignore[arg-type]


def test_unknown_method_suggests_the_closest() -> None:
    q, k, v = qkv()
    with pytest.raises(
        UnknownMethodError, match="unknown attention method 'sliding_windo'. Did you mean 'sliding_window'"
    ):
        attnlab.attention(q, k, v, method="sliding_windo")


def test_unknown_parameter_suggests_the_closest() -> None:
    q, k, v = qkv()
    with pytest.raises(
        ParamError, match="no parameter 'windw'. Did you mean 'window'.*parameters are: window"
    ):
        attnlab.attention(q, k, v, method="sliding_window", windw=4)


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("sliding_window", {"window": 0}, r"window=0 is invalid; expected an integer >= 1"),
        ("sliding_window", {"window": 2.5}, r"window=2.5 is invalid; expected an integer"),
        ("sliding_window", {"window": True}, r"window=True is invalid; expected an integer"),
        ("streaming", {"sinks": -1}, r"sinks=-1 is invalid; expected an integer >= 0"),
        ("dilated", {"dilation": 0}, r"dilation=0 is invalid"),
        ("block_local", {"neighbors": -2}, r"neighbors=-2 is invalid"),
        ("sigmoid", {"bias": float("nan")}, r"bias=nan is invalid; expected a finite number or None"),
    ],
)
def test_parameter_ranges(method: str, params: dict, match: str) -> None:
    q, k, v = qkv()
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, k, v, method=method, **params)


def test_forced_backend_that_cannot_run_says_why() -> None:
    q, k, v = qkv()
    q.requires_grad_(True)
    with pytest.raises(
        BackendError,
        match="(?s)backend 'flex' of method 'sliding_window' cannot run .*- flex: FlexAttention has no backward on CPU",
    ):
        attnlab.attention(q, k, v, method="sliding_window", window=4, backend="flex")


def test_unknown_backend_lists_the_methods_backends() -> None:
    q, k, v = qkv()
    with pytest.raises(
        ParamError, match="no backend 'flexx'. Did you mean 'flex'.*flex, block_sparse, sdpa_mask"
    ):
        attnlab.attention(q, k, v, method="sliding_window", backend="flexx")


def test_no_backend_lists_every_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attnlab.settings, "max_dense_elements", 100)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU as users have it: no Triton interpreter
    q, k, v = qkv()
    q.requires_grad_(True)
    with pytest.raises(BackendError) as info:
        attnlab.attention(q, k, v, method="sliding_window", window=4)
    msg = str(info.value)
    assert "no backend of method 'sliding_window' can run" in msg
    assert "- flex: FlexAttention has no backward on CPU" in msg
    assert "- block_sparse: Triton kernels need a CUDA GPU" in msg
    assert "- sdpa_mask: sdpa_mask would materialise" in msg
    # (the dense fallback refused for its size: DenseTooLargeError, a BackendError, without a named backend too)
    assert isinstance(info.value, DenseTooLargeError)


def test_dense_fallback_refuses_n_by_n_above_the_limit_and_names_the_fast_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attnlab.settings, "max_dense_elements", 1000)
    q, k, v = qkv()
    with pytest.raises(
        DenseTooLargeError, match=r"reference would materialise 1,024 score elements.*a fast backend"
    ):
        attnlab.attention(q, k, v, method="sigmoid", backend="reference")
    with pytest.raises(
        DenseTooLargeError, match=r"materialise .* above the limit of 1,000 .*max_dense_elements"
    ):
        attnlab.get("softmax").reference(
            q, k, v, attnlab.get("softmax").make_params({}), causal=False, scale=1.0
        )


def test_unsupported_pattern_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from attnlab import registry
    from attnlab.patterns import SELF_PATTERNS

    spec = attnlab.get("softmax")
    monkeypatch.setitem(registry._REGISTRY, "softmax", dataclasses.replace(spec, patterns=SELF_PATTERNS))
    q, k, v = qkv(n=8, nk=16)
    with pytest.raises(
        UnsupportedPatternError,
        match=r"'softmax' does not define the noncausal_cross pattern \(N_q=8, N_k=16",
    ):
        attnlab.attention(q, k, v)


def test_gqa_refused_for_a_method_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from attnlab import registry

    spec = attnlab.get("softmax")
    monkeypatch.setitem(registry._REGISTRY, "softmax", dataclasses.replace(spec, gqa=False))
    q, k, v = qkv(h=4, hk=2)
    with pytest.raises(
        InputError, match=r"does not support grouped-query attention .*repeat_interleave\(2, dim=1\)"
    ):
        attnlab.attention(q, k, v)


@pytest.mark.parametrize(
    "method", ["softmax", "sigmoid", "sliding_window", "streaming", "dilated", "block_local"]
)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_fully_masked_rows_are_zero_not_nan(method: str, backend: str | None) -> None:
    # causal cross with N_q > N_k: the first N_q - N_k queries have no key
    q, k, v = qkv(n=24, nk=10)
    for t in (q, k, v):
        t.requires_grad_(True)
    params = {"window": 3} if method in ("sliding_window", "dilated", "streaming") else {}
    out = attnlab.attention(q, k, v, method=method, causal=True, backend=backend, **params)
    assert torch.isfinite(out).all()
    assert (out[:, :, :14] == 0).all()
    assert out[:, :, 14:].abs().sum() > 0
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert (q.grad[:, :, :14] == 0).all()


def test_explain_names_the_choice_and_the_refusals() -> None:
    q, k, v = qkv()
    q.requires_grad_(True)
    choice = attnlab.explain(q, k, v, method="dilated", causal=True, window=2)
    assert choice.backend is not None and choice.backend.name == "sdpa_mask"
    assert "flex refused: FlexAttention has no backward on CPU" in choice.explain()
    assert "runs on backend 'sdpa_mask'" in repr(choice)  # prints readably in a REPL


def test_explain_checks_the_tensor_inputs_as_a_call_does() -> None:
    """explain names no backend for a call that would be refused for its tensor inputs: a wrong shape, a
    missing required input, an unknown name; bind refuses an unknown name instead of dropping it."""
    q, k, v = qkv()
    with pytest.raises(InputError, match="sinks"):
        attnlab.attention(q, k, v, method="sink", sinks=torch.randn(1))
    with pytest.raises(InputError, match="sinks"):
        attnlab.explain(q, k, v, method="sink", sinks=torch.randn(1))
    with pytest.raises(InputError, match="needs the tensor input g"):
        attnlab.explain(q, k, v, method="gla", causal=True)
    with pytest.raises(ParamError, match="no parameter 'bias'"):  # (explain's keywords are parameters too)
        attnlab.explain(q, k, v, method="sink", bias=torch.randn(1))
    with pytest.raises(ParamError, match="takes no tensor input 'bias'"):
        attnlab.prepare("sink").explain(q, k, v, bias=torch.randn(1))
    with pytest.raises(ParamError, match="takes no tensor input 'bias'"):
        attnlab.prepare("sink").bind(q, k, v, bias=torch.randn(1))
    assert attnlab.explain(q, k, v, method="sink", sinks=torch.randn(q.shape[1])).backend is not None


def test_refusal_messages_say_what_to_do() -> None:
    """return_lse refused on a CPU names the reference backend (which returns it); an integer or bool mask
    where a float input is expected gets the conversion; a wrong state is named once."""
    q, k, v = qkv()
    # (strided_heads: no CPU backend returns an lse, also not under the interpreter the tests run in)
    with pytest.raises(BackendError, match="backend='reference' returns the log-sum-exp"):
        attnlab.attention(q, k, v, method="strided_heads", causal=True, return_lse=True)
    res = attnlab.attention(
        q, k, v, method="strided_heads", causal=True, return_lse=True, backend="reference"
    )
    assert res.lse is not None
    q1 = q[:, :, :1]
    with pytest.raises(
        InputError, match=r"key_mask has dtype torch.bool; expected a floating dtype \(convert"
    ):
        attnlab.attention(
            q1, k, v, method="page_topk", causal=True, key_mask=torch.ones(1, k.shape[2], dtype=torch.bool)
        )
    with pytest.raises(ParamError, match="'sinks' is a tensor input of method 'sink', given per call"):
        attnlab.prepare("sink", sinks=torch.zeros(q.shape[1]))
    with pytest.raises(ParamError, match="'logit' is a parameter: give it to prepare"):
        attnlab.prepare("sink")(q, k, v, logit=1.0)
    with pytest.raises(InputError, match="^page_topk: state must be"):
        attnlab.attention(q1, k, v, method="page_topk", causal=True, state=3)


def test_a_cached_op_never_answers_a_parameter_equal_to_it_by_value_only() -> None:
    """True == 1 and hashes alike: window=True after window=1 (and scale=True after scale=1) must still be
    refused, not served by the op cached for the valid value."""
    q, k, v = qkv()
    attnlab.attention(q, k, v, method="sliding_window", window=1)
    with pytest.raises(ParamError, match="window=True is invalid; expected an integer"):
        attnlab.attention(q, k, v, method="sliding_window", window=True)
    attnlab.attention(q, k, v, method="softmax", scale=1)
    with pytest.raises(InputError, match="scale must be a positive finite number"):
        attnlab.attention(q, k, v, method="softmax", scale=True)


def test_tensor_inputs_are_checked_once_per_signature_and_still_refused_when_they_change() -> None:
    """validate_extra remembers the signatures that passed (a decode loop repeats them): the same shapes
    skip the check and return the given tensors; a new shape, dtype or device is checked in full."""
    from attnlab import inputs

    spec = attnlab.get("gated_delta")
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)
    beta, g = torch.rand(1, 2, 4, device=q.device), -torch.rand(1, 2, 4, 1, device=q.device)
    problem = inputs.validate(q, k, v, causal=True, scale=None)
    inputs._VALID.clear()
    got = inputs.validate_extra(spec.inputs, {"beta": beta, "g": g}, problem, "gated_delta")
    assert got["beta"] is beta and got["g"] is g and len(inputs._VALID) == 1
    # another tensor of the same signature: remembered, returned as given
    beta2 = torch.rand(1, 2, 4, device=q.device)
    again = inputs.validate_extra(spec.inputs, {"beta": beta2, "g": g}, problem, "gated_delta")
    assert again["beta"] is beta2 and len(inputs._VALID) == 1
    with pytest.raises(InputError, match="beta has shape"):  # a new shape: checked, refused
        bad = torch.rand(1, 2, 5, device=q.device)
        inputs.validate_extra(spec.inputs, {"beta": bad, "g": g}, problem, "gated_delta")
    with pytest.raises(InputError, match="g has dtype"):  # a new dtype: checked, refused
        inputs.validate_extra(spec.inputs, {"beta": beta, "g": g.long()}, problem, "gated_delta")
    with pytest.raises(InputError, match="must be a torch.Tensor"):  # not a tensor: never cached
        inputs.validate_extra(spec.inputs, {"beta": [0.5], "g": g}, problem, "gated_delta")
    assert len(inputs._VALID) == 1


def test_explain_lists_triton_backends_passed_over_on_a_cpu() -> None:
    """On a CPU a Triton backend (interpreted there) is passed over when another backend can run the call:
    explain says so, in priority order, instead of leaving it out."""
    q, k, v = qkv()
    choice = attnlab.explain(q, k, v, method="dilated", causal=True, window=2)
    names = [name for name, _ in choice.refusals]
    assert choice.backend is not None and choice.backend.name == "flex"
    assert names[0] == "block_sparse"  # first in priority, skipped on a CPU
    assert "block_sparse refused: passed over on a CPU: a Triton kernel" in choice.explain()
    sig = attnlab.explain(q, k, v, method="sigmoid", causal=True)
    assert any(name == "triton" and "passed over on a CPU" in why[0] for name, why in sig.refusals)
    forced = attnlab.explain(q, k, v, method="sigmoid", causal=True, backend="triton")
    if os.environ.get("TRITON_INTERPRET") == "1":  # named, with the interpreter on: it runs
        assert forced.backend is not None and forced.backend.name == "triton" and forced.refusals == ()
    else:  # (a GPU machine's CPU tensors: no interpreter, refused with the reason)
        assert forced.backend is None and "Triton's interpreter" in forced.explain()
