"""Correctness before timing: each (method, backend, parameters, pattern, grad) is checked against the
method's reference on this device (small shapes, the run's dtype and head dim) before any of its rows is
timed. A failed or crashed check makes the row ``incorrect: ...`` and it is not timed. A check the backend
skipped on the small case (it refused it) is recorded as skipped, not as passed; its rows are timed."""

from __future__ import annotations

import json
import math
from typing import Any

import attnlab
from attnlab.bench.config import BenchConfig
from attnlab.testing import Case, check_parity


class ParityChecks:
    """Runs each check once per run; ``rows`` holds one record per check for the ``checks`` table."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.results: dict[tuple[Any, ...], tuple[bool, str]] = {}
        self.rows: list[dict[str, Any]] = []

    def check(
        self,
        spec: attnlab.MethodSpec,
        backend: str,
        params: dict[str, Any],
        causal: bool,
        cross: bool,
        grad: bool,
    ) -> tuple[bool, str]:
        """(may be timed, detail) of this backend on a small case of the run's dtype and head dim."""
        key = (spec.name, backend, json.dumps(params, sort_keys=True), causal, cross, grad)
        if key in self.results:
            return self.results[key]
        c = self.cfg
        n_q, n_k = (96, 384) if cross else (384, 384)
        kv_heads = max(1, 4 * c.n_kv_heads // c.heads)
        try:
            check_params = _at_length(spec, params, n_k)
            case = Case(1, 4, kv_heads, n_q, n_k, c.head_dim, c.torch_dtype, causal, check_params or {})
            if check_params is None:
                passed, skipped, detail = (
                    False,
                    "",
                    (
                        f"parameters {json.dumps(params, sort_keys=True, default=str)} bind a grid shape of "
                        f"{math.prod(params['shape'])} tokens, and the method's bench_params({n_k}) has no set with "
                        f"the same keys for the check's {n_k} tokens: add one there (or time this set without "
                        "the bench, e.g. benchmarks/variants_bench.py)"
                    ),
                )
            else:
                res = check_parity(spec, backend, case, c.torch_device, backward=grad)
                passed, skipped, detail = res.passed, res.skipped, res.summary()
                if check_params != params:
                    detail = f"checked with {json.dumps(check_params, sort_keys=True)}: {detail}"
        except Exception as e:  # a crash in the check is a failed check, recorded
            passed, skipped, detail = False, "", f"error: {type(e).__name__}: {e}"
        ok = passed or bool(skipped)
        self.results[key] = (ok, detail)
        self.rows.append(
            {
                "method": spec.name,
                "backend": backend,
                "params": key[2],
                "pattern": ("causal_" if causal else "noncausal_") + ("cross" if cross else "self"),
                "dtype": c.dtype,
                "grad": grad,
                "passed": passed,
                "skipped": skipped or None,
                "detail": detail,
            }
        )
        return ok, detail


def _at_length(spec: attnlab.MethodSpec, params: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The parameters the check runs with at its length ``n``: ``params`` themselves, unless they bind a
    grid ``shape`` holding another number of tokens (multi_axis, 2-D/3-D neighborhood: such a set runs at
    one length only); then the method's own benchmark set of the same keys at length ``n``, or None when
    it has none."""
    shape = params.get("shape")
    if shape is None or math.prod(shape) == n:
        return params
    same = [p for p in spec.bench_params(n) if set(p) == set(params) and math.prod(p["shape"]) == n]
    return same[0] if same else None
