"""The benchmark's pre-timing parity check with parameter sets bound to one length (a grid ``shape``)."""

from __future__ import annotations

import attnlab
from attnlab.bench.checks import ParityChecks, _at_length
from attnlab.bench.config import BenchConfig


def test_shape_bound_parameters_are_checked_with_the_methods_set_at_the_check_length() -> None:
    """multi_axis timed at 16384 tokens binds shape=(128, 128); the check (384 tokens) runs the method's own
    benchmark set for 384 tokens instead of failing on the shape, says so in its detail, and passes; a
    set with no counterpart at the check length is a failed check with the reason, never a pass."""
    spec = attnlab.get("multi_axis")
    timed = spec.bench_params(16384)[0]
    assert tuple(timed["shape"]) == (128, 128)
    at_384 = _at_length(spec, timed, 384)
    assert at_384 is not None and at_384["shape"] == (24, 16) and set(at_384) == set(timed)
    assert _at_length(spec, {"window": 7}, 384) == {"window": 7}  # no shape: unchanged
    assert _at_length(spec, {"shape": (24, 16), "block": 2, "grid": 2}, 384) == {
        "shape": (24, 16),
        "block": 2,
        "grid": 2,
    }
    assert _at_length(spec, {"shape": (128, 128), "foo": 1}, 384) is None

    checks = ParityChecks(BenchConfig.preset("cpu"))
    ok, detail = checks.check(spec, "sdpa_mask", timed, causal=False, cross=False, grad=False)
    assert ok and detail.startswith('checked with {"block": 4, "grid": 4, "shape": [24, 16]}'), detail
    ok, detail = checks.check(spec, "sdpa_mask", {"shape": (128, 128), "foo": 1}, causal=False, cross=False,
                              grad=False)  # fmt: skip
    assert (
        not ok and "bind a grid shape of 16384 tokens" in detail and "bench_params(384) has no set" in detail
    )
    assert checks.rows[-1]["passed"] is False
