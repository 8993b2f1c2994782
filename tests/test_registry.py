"""The registry drives everything: each method must be complete, and the README's matrix must be current."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import attnlab
from attnlab.support import README_BEGIN, README_END, readme_block, records

ROOT = Path(__file__).resolve().parents[1]
METHODS = list(attnlab.methods())


def test_the_p0_methods_of_the_foundation_are_registered() -> None:
    for name in ("softmax", "sigmoid", "sliding_window", "streaming", "dilated", "block_local"):
        assert name in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_method_is_complete(name: str) -> None:
    spec = attnlab.get(name)
    # a reference whose docstring states the math
    assert callable(spec.reference)
    doc = inspect.getdoc(spec.reference) or ""
    assert len(doc) > 40, f"{name}: reference needs a docstring with its math"
    # a parity test: the parity suite iterates test_params; each set must be valid
    assert spec.test_params, f"{name}: no parity-test parameters"
    for params in spec.test_params:
        spec.make_params(params)
    # a benchmark entry: bench_params gives valid parameter sets at every length
    for n in (128, 4096, 131072):
        sets = spec.bench_params(n)
        assert sets, f"{name}: no benchmark parameters at n={n}"
        for params in sets:
            spec.make_params(params)
    assert spec.backends, f"{name}: no backend"
    assert spec.patterns, f"{name}: no pattern"
    assert spec.param_class.method == name
    assert inspect.getdoc(spec.param_class), f"{name}: parameters need a docstring (meaning and defaults)"
    assert spec.params == spec.param_class(), "spec.params shows the defaults"
    if spec.mask is not None:
        assert spec.index_mask is not None, f"{name}: a mask method needs its index-arithmetic definition"


def test_benchmark_and_parity_suites_iterate_the_registry() -> None:
    from attnlab.bench.efficiency import planned_rows
    from attnlab.testing import CPU_FULL_PARITY, on_cuda, parity_cases

    in_parity = {(m, b) for m, b, _ in parity_cases(on_cuda())}
    for name, spec in attnlab.methods().items():
        for backend in spec.backends:
            if not on_cuda() and name not in CPU_FULL_PARITY and backend.name == "flex":
                continue  # a CPU's compact set has no compiled Flex (the method's own tests check it here)
            assert (name, backend.name) in in_parity, f"{name}/{backend.name} has no parity test"
    benched = {row.method for row in planned_rows(lengths=(1024,), methods=None)}
    assert benched == set(METHODS)


def test_readme_support_matrix_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    assert text[start:end] == readme_block(), "README support matrix is stale: run `attnlab list --markdown`"


def test_list_json_schema() -> None:
    rows = records()
    json.dumps(rows)
    assert [r["name"] for r in rows] == METHODS
    for r in rows:
        assert set(r) >= {"name", "family", "backends", "patterns", "gqa", "backward"}


def test_parameter_refusals_are_by_design_and_left_out_of_parity() -> None:
    """A backend's parameter refusals (e.g. softcap's kernel has no window) refuse the call on any device,
    and the parity suite never generates such a (backend, parameters) case, so on CUDA a refusal left in
    test_parity is a real one (the H100 run at 158d855 failed softcap/triton with window=3 this way)."""
    import torch

    from attnlab.testing import parity_cases

    spec = attnlab.get("softcap")
    windowed = spec.make_params({"cap": 2.0, "window": 3})
    assert spec.backend("triton").param_refusals(windowed)
    assert not spec.backend("triton").param_refusals(spec.make_params({"cap": 2.0}))
    assert not spec.backend("flex").param_refusals(windowed)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(attnlab.BackendError, match="no window"):
        attnlab.attention(q, q, q, method="softcap", cap=2.0, window=3, backend="triton")
    refused = attnlab.get("softplus").backend("triton").param_refusals
    assert refused(attnlab.get("softplus").make_params({"reweight": 2}))
    for cuda in (True, False):
        for method, backend, case in parity_cases(cuda):
            spec = attnlab.get(method)
            assert not spec.backend(backend).param_refusals(spec.make_params(case.params)), (method, case)
