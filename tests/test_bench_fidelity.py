"""Fidelity measures: error relative to uniform attention, recall only where a method has a plan, and
budgets that pair with the speed sweep."""

from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.bench.fidelity import fidelity_rows, uniform_output
from attnlab.bench.planning import densities, planned_rows
from attnlab.bench.workloads import Workload, random_workload
from attnlab.patterns import Pattern

CPU = torch.device("cpu")
SELF = (Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF)


def test_uniform_output_averages_v_over_the_allowed_keys() -> None:
    v = torch.randn(2, 3, 7, 5)
    torch.testing.assert_close(
        uniform_output(v, 7, causal=False), v.mean(2, keepdim=True).expand(-1, -1, 7, -1)
    )
    causal = uniform_output(v, 7, causal=True)
    for i in range(7):
        torch.testing.assert_close(causal[:, :, i], v[:, :, : i + 1].mean(2))


def _rows(workload: Workload, budgets: str = "first") -> list[dict]:
    return list(fidelity_rows(workload, None, SELF, budgets))


def test_error_vs_uniform_is_zero_for_dense_and_does_not_depend_on_the_scale_or_mean_of_v() -> None:
    wl = random_workload(256, 2, 32, CPU)
    rows = _rows(wl)
    assert all(r["out_err_vs_uniform"] < 1e-4 for r in rows if r["method"] == "softmax")
    assert all(r["out_err_vs_uniform"] > 0.05 for r in rows if r["method"] == "sliding_window")
    name, q, k, v = wl.layers[0]
    base = {(r["method"], r["pattern"], r["head"]): r for r in rows}
    for r in _rows(Workload("scaled", "", [(name, q, k, 10 * v + 3)])):
        # the relative error changes with V's scale and mean; the error vs uniform does not, for every
        # method whose weights sum to 1 (sigmoid's do not, so V's mean moves its output)
        old = base[(r["method"], r["pattern"], r["head"])]
        # (token_sparse's dropped query rows are zeros: their weights do not sum to 1 either)
        if attnlab.get(r["method"]).softmax_normalized and r["method"] not in ("sigmoid", "token_sparse"):
            assert r["out_err_vs_uniform"] == pytest.approx(old["out_err_vs_uniform"], rel=1e-3, abs=1e-6), r
        # a sparse method's relative error moves with V (where its plan is sparse: block_topk's first budget
        # at 256 tokens keeps both 128-token blocks, so it is dense there and its error is rounding)
        if attnlab.get(r["method"]).plan_kind is not None and r["density"] < 1.0:
            assert r["out_rel_err"] != pytest.approx(old["out_rel_err"], rel=1e-2), r


def test_recall_is_na_without_a_plan_and_measured_with_one() -> None:
    rows = _rows(random_workload(256, 2, 32, CPU))
    by_method: dict[str, list] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["mass_recall"])
    assert all(x is None for x in by_method["sigmoid"])
    assert all(x == pytest.approx(1.0) for x in by_method["softmax"])
    assert all(0.0 < x < 1.0 for x in by_method["sliding_window"])


@pytest.mark.parametrize("budgets", ["first", "all"])
def test_fidelity_budgets_and_densities_pair_with_the_speed_sweep(budgets: str) -> None:
    n = 256
    workload = random_workload(n, 1, 32, CPU)
    rows = _rows(workload, budgets)
    speed = planned_rows((n,), None, SELF, ("fwd",), budgets)
    # (parameters as the fidelity rows store them: through JSON, so tuples read back as lists)
    pairs = {
        (r.method, r.pattern.value, str(sorted(json.loads(json.dumps(r.params)).items()))) for r in speed
    }
    for r in rows:
        params = json.loads(r["params"])
        assert (r["method"], r["pattern"], str(sorted(params.items()))) in pairs
        spec = attnlab.get(r["method"])
        causal = r["pattern"] == "causal_self"
        q, k = {name: (q, k) for name, q, k, _ in workload.layers}[r["layer"]]  # dynamic: from q, k
        assert (r["density"], r["block_density"]) == densities(
            spec, spec.make_params(params), n, n, causal, CPU, q, k
        )


def test_a_method_whose_call_is_refused_gets_no_rows_and_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused call (e.g. a method whose only backend is a Triton kernel, on a CPU without the interpreter)
    skips that method with its reason instead of ending the fidelity part; the others keep their rows."""
    from attnlab.bench import fidelity
    from attnlab.errors import BackendError

    real = fidelity.attnlab.attention

    def refuse(*args: object, method: str, **kw: object) -> object:
        if method == "sliding_window":
            raise BackendError(
                "no backend of method 'sliding_window' can run this call:\n  - x: refused here"
            )
        return real(*args, method=method, **kw)

    monkeypatch.setattr(fidelity.attnlab, "attention", refuse)
    skipped: dict[str, str] = {}
    wl = random_workload(128, 1, 16, CPU)
    rows = list(fidelity_rows(wl, ("softmax", "sliding_window"), SELF, "first", skipped=skipped))
    assert {r["method"] for r in rows} == {"softmax"}
    assert skipped == {"sliding_window": "x: refused here"}
