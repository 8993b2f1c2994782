"""Review fixes of the structured methods: the reference's log-sum-exp and plan of strided_heads (and of any
method whose sparsity its backends define), the op cache's key of tuple parameters, grid lengths checked
when a call is resolved, and multi_axis' shape message."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import pytest
import torch

import attnlab
from attnlab.api import _OPS, _typed
from attnlab.backends.eager import REFERENCE
from attnlab.catalog.structured.strided_heads import head_mask
from attnlab.errors import BackendError, InputError, ParamError
from attnlab.patterns import Pattern
from attnlab.registry import methods

STRIDED = {"block": 2, "local": 1, "vert_stride": 3}


# -- the reference's lse and plan of strided_heads -----------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_reference_lse_of_strided_heads_is_over_its_per_head_mask(causal: bool) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 12, 16)
    r = attnlab.attention(q, q, q, method="strided_heads", backend="reference", causal=causal,
                          return_lse=True, **STRIDED)  # fmt: skip
    m = head_mask(attnlab.get("strided_heads").make_params(STRIDED), 12, 12, causal, 2, 2, "cpu")
    want = ((q @ q.mT) / 4).masked_fill(~m[None], -math.inf).logsumexp(-1)
    torch.testing.assert_close(r.lse, want)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_plan_of_strided_heads_is_the_per_head_plan(causal: bool) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 12, 16)
    m = head_mask(attnlab.get("strided_heads").make_params(STRIDED), 12, 12, causal, 2, 2, "cpu")
    for backend in ("reference", "sdpa_mask", "flex"):
        r = attnlab.attention(q, q, q, method="strided_heads", backend=backend, causal=causal,
                              return_plan=True, **STRIDED)  # fmt: skip
        assert r.plan is not None, backend
        assert torch.equal(r.plan.dense_mask()[0], m), backend


def _allowed_pattern_causal(spec: Any) -> bool | None:
    if Pattern.CAUSAL_SELF in spec.patterns:
        return True
    return False if Pattern.NONCAUSAL_SELF in spec.patterns else None


CASES = [
    (name, spec.test_params[0] if spec.test_params else {})
    for name, spec in methods().items()
    if spec.softmax_normalized and not spec.stateful
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_reference_lse_agrees_with_the_reference_output(name: str, params: dict[str, Any]) -> None:
    """Whatever a method's reference masks (a static mask, an estimate, a per-head mask), its lse is over the
    same keys: with one-hot values (v = I) the output is the weights, ``p_ij = exp(s_ij - lse_i)``, so every
    row's largest weight gives ``lse_i = s_ij - log p_ij`` (rows with no key: lse -inf)."""
    spec = attnlab.get(name)
    causal = _allowed_pattern_causal(spec)
    if causal is None:
        pytest.skip(f"{name} defines no self-attention pattern")
    n = 16
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, n, n), torch.randn(1, 2, n, n)
    v = torch.eye(n).expand(1, 2, n, n).contiguous()
    r = attnlab.attention(q, k, v, method=name, backend="reference", causal=causal, return_lse=True, **params)
    s = (q @ k.mT) / math.sqrt(n)
    p, j = r.out.max(-1, keepdim=True)
    rows = p[..., 0] > 1e-6
    implied = (s.gather(-1, j) - p.log())[..., 0]
    torch.testing.assert_close(r.lse[rows], implied[rows], rtol=1e-4, atol=1e-4)
    assert (r.lse[~rows] == -math.inf).all()


def test_reference_lse_refused_for_a_method_whose_mask_it_cannot_know() -> None:
    """A non-dense method with no mask, no estimator and no backend that reports a plan: the reference
    cannot know which keys its reference keeps, so it refuses the lse instead of giving the dense one."""
    q = torch.randn(1, 2, 12, 16)
    call = attnlab.resolve(q, q, q, method="strided_heads", return_lse=True, **STRIDED)
    call = replace(call, spec=replace(call.spec, backends=()))
    with pytest.raises(
        BackendError, match=r"log-sum-exp of method 'strided_heads' \(family 'static'\).*expected"
    ):
        REFERENCE.run_lse(q, q, q, call, {})


# -- the op cache's key of tuple parameters -------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "valid", "bad"),
    [
        ("neighborhood", {"shape": (3, 4), "window": (1, 3)}, {"window": (True, 3.0)}),
        ("neighborhood", {"shape": (3, 4), "window": 3}, {"shape": (3.0, 4.0)}),
        (
            "neighborhood",
            {"shape": (3, 4), "window": 3, "axis_causal": (True, False)},
            {"axis_causal": (1, 0)},
        ),
        ("doc_blocks", {"boundaries": (2, 5)}, {"boundaries": (2.0, 5.0)}),
    ],
)
def test_cached_op_does_not_serve_tuples_of_other_element_types(
    method: str, valid: dict[str, Any], bad: dict[str, Any]
) -> None:
    """``(True, 3.0) == (1, 3)`` with equal hashes: the op of the valid tuple must not serve the other."""
    q = torch.randn(1, 2, 12, 16)
    attnlab.attention(q, q, q, method=method, **valid)
    cached = len(_OPS)
    attnlab.attention(q, q, q, method=method, **valid)  # a tuple parameter still finds its op
    assert len(_OPS) == cached
    [(name, value)] = bad.items()
    with pytest.raises(ParamError, match=re.escape(f"parameter {name}={value!r} is invalid; expected")):
        attnlab.attention(q, q, q, method=method, **{**valid, **bad})


def test_typed_key_tells_nested_and_set_elements_apart() -> None:
    assert _typed((1, (True,))) != _typed((1, (1,)))
    assert _typed((1, (2, 3))) == _typed((1, (2, 3)))
    assert _typed(frozenset({True, 2})) != _typed(frozenset({1, 2}))
    assert _typed((1.0, 2)) != _typed((1, 2))


# -- grid lengths checked when a call is resolved --------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("neighborhood", {"shape": (3, 4), "window": 3}),
        ("multi_axis", {"shape": (3, 4), "block": 2, "grid": 2}),
        ("bilevel_routing", {"shape": (3, 4), "regions": 1}),
    ],
)
def test_explain_and_resolve_refuse_a_grid_that_does_not_hold_the_sequence(
    method: str, params: dict[str, Any]
) -> None:
    q = torch.randn(1, 2, 13, 16)
    message = rf"method '{method}': shape=\(3, 4\) holds 12 tokens but the sequence has N=13; expected a shape whose product is 13"
    for fn in (attnlab.explain, attnlab.resolve, attnlab.attention):
        with pytest.raises(InputError, match=message):
            fn(q, q, q, method=method, **params)
    # packed: the sequence whose length the grid does not hold is named
    qp = torch.randn(1, 2, 25, 16)
    cu = torch.tensor([0, 12, 25])
    with pytest.raises(InputError, match="sequence 1 of the packed call: " + message):
        attnlab.explain(qp, qp, qp, method=method, cu_seqlens_q=cu, **params)
    q24 = qp[:, :, :24]  # two sequences of 12: explained
    attnlab.explain(q24, q24, q24, method=method, cu_seqlens_q=torch.tensor([0, 12, 24]), **params)


# -- multi_axis' shape message ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 1), (12,), (0, 4), (3.0, 4), (True, 4), "3x4"])
def test_multi_axis_shape_is_refused_with_one_message(shape: Any) -> None:
    with pytest.raises(
        ParamError,
        match=re.escape(
            f"shape={shape!r} is invalid; expected None (a 1 x N grid) or a (height, width) tuple of positive ints"
        ),
    ):
        attnlab.prepare("multi_axis", shape=shape)
