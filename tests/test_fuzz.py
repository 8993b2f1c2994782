"""Hypothesis: random shapes, patterns and parameters; the default backend must match the reference."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.patterns import pattern_of
from attnlab.testing import FWD_FACTOR, Case, bound, max_abs

METHODS = list(attnlab.methods())


@st.composite
def calls(draw: st.DrawFn) -> tuple:
    method = draw(st.sampled_from(METHODS))
    spec = attnlab.get(method)
    params = {}
    for f in dataclasses.fields(spec.params):
        if f.type in ("int", int):
            params[f.name] = draw(st.integers(min_value=0, max_value=70))
        elif "float" in str(f.type):
            params[f.name] = draw(st.one_of(st.none(), st.floats(min_value=-8, max_value=4)))
    try:
        spec.make_params(params)
    except ParamError:
        assume(False)
    kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    n_q = draw(st.integers(1, 90))
    n_k = draw(st.integers(1, 90))
    causal = draw(st.booleans())
    assume(pattern_of(causal, n_q, n_k) in spec.patterns)  # a pattern the method does not define: refused
    batch = draw(st.integers(1, 2))
    return method, params, batch, kv * group, kv, n_q, n_k, causal


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(calls())
def test_default_backend_matches_reference(call: tuple) -> None:
    method, params, b, h, hk, n_q, n_k, causal = call
    case = Case(b, h, hk, n_q, n_k, 32, torch.float32, causal)
    q, k, v = case.inputs("cpu", seed=n_q * 131 + n_k)
    spec = attnlab.get(method)
    extra = case.tensor_inputs(spec, "cpu")  # required gates, beta, ...: valid values
    try:
        out = attnlab.attention(q, k, v, method=method, causal=causal, **params, **extra)
    except InputError:  # shapes a method's parameters exclude (a grid that does not hold N tokens, ...)
        assume(False)
    ref = spec.reference(q, k, v, spec.make_params(params), causal=causal, scale=32**-0.5, **extra)
    if spec.stateful:  # a Result and (out, state)
        assert isinstance(out, Result)
        out, ref = out.out, ref[0]
    assert out.shape == (b, h, n_q, 32)
    assert torch.isfinite(out).all()
    assert max_abs(out, ref) <= bound(0.0, ref, FWD_FACTOR, torch.float32)
    if causal and n_q > n_k:  # queries before the first key see nothing: exact zeros
        assert (out[:, :, : n_q - n_k] == 0).all()
