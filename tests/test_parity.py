"""Every backend of every registered method against the method's fp32 reference (forward and backward).

Cases come from the registry: each method's supported patterns and ``test_params``, on odd shapes. On a
CPU machine, backends that cannot run here (CUDA-only, or no CPU backward) report a skip reason that
the test checks is the backend's own refusal, not an error; the same tests run at full size on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.testing import Case, check_parity, device_under_test, on_cuda, parity_cases

ON_CUDA = on_cuda()
DEVICE = device_under_test()
CASES = parity_cases(ON_CUDA)


@pytest.mark.parametrize(
    ("method", "backend", "case"), CASES, ids=[f"{m}-{b}-{c.label()}" for m, b, c in CASES]
)
def test_backend_matches_reference(method: str, backend: str, case: Case) -> None:
    spec = attnlab.get(method)
    check = check_parity(spec, backend, case, DEVICE)
    if check.skipped:
        # Only refusals that this machine explains are allowed (CUDA-only paths, no CPU backward).
        assert not ON_CUDA or backend == "eager", f"{backend} refused on CUDA: {check.skipped}"
        assert any(w in check.skipped for w in ("CUDA", "CPU", "float16")), check.skipped
        pytest.skip(check.skipped)
    assert check.errors["out"][0] == check.errors["out"][0], "NaN in output"
    assert check.passed, f"{method}/{backend} {case.label()}: {check.summary()}"
    if spec.reference_lse is not None and spec.backend(backend).caps.lse and (ON_CUDA or backend != "flex"):
        # a variant's lse, against its reference_lse (compiled CPU FlexAttention returns none)
        assert "lse" in check.errors, f"{backend} did not check the lse of {method}"
    if spec.backward and attnlab.get(method).backend(backend).backward:
        # the backward must have been checked wherever the backend can run with gradients
        assert "dq" in check.errors or not ON_CUDA, f"{backend} did not check gradients on CUDA"


@pytest.mark.skipif(ON_CUDA, reason="on CUDA the full parity set above runs Flex for every method")
@pytest.mark.parametrize("method", ["streaming", "dilated", "block_local"])
def test_static_methods_on_cpu_flex(method: str) -> None:
    """The static methods outside CPU_FULL_PARITY on a CPU's compiled Flex: one causal cross case, forward
    (a CPU's compiled Flex has no backward; the compact CPU set leaves Flex out)."""
    spec = attnlab.get(method)
    case = Case(1, 4, 2, 63, 130, 32, torch.float32, True, dict(spec.test_params[0]))
    check = check_parity(spec, "flex", case, DEVICE)
    assert check.passed and "out" in check.errors, check.summary()
