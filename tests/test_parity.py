"""Every backend of every registered method against the method's fp32 reference (forward and backward).

Cases come from the registry: each method's supported patterns and ``test_params``, on odd shapes. On a
CPU machine, backends that cannot run here (CUDA-only, or no CPU backward) report a skip reason that
the test checks is the backend's own refusal, not an error; the same tests run at full size on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.testing import Case, cases_for, check_parity
from tests.conftest import DEVICE, ON_CUDA

LENGTHS = ((1, 1), (63, 63), (257, 257), (1000, 1000), (63, 257), (257, 63), (1, 1000))
TRITON_LENGTHS = ((1, 1), (17, 17), (63, 63), (20, 45), (45, 20), (1, 33))


def _cases() -> list[tuple[str, str, Case]]:
    out = []
    for name, spec in attnlab.methods().items():
        for backend in spec.backends:
            interp = backend.name == "triton" and not ON_CUDA
            if interp:  # Triton's CPU interpreter is slow: tiny shapes, odd head dims
                cases = cases_for(
                    spec,
                    lengths=TRITON_LENGTHS,
                    head_dims=(16, 24),
                    groups=(1, 2),
                    dtypes=(torch.float32, torch.bfloat16),
                    heads=2,
                    batch=2,
                    all_params=False,
                )
            else:  # both head dims and both GQA ratios, paired (each compiled kernel costs time)
                main = torch.bfloat16 if ON_CUDA else torch.float32
                cases = [
                    *cases_for(
                        spec, lengths=LENGTHS, head_dims=(64,), groups=(4,), dtypes=(main,), all_params=False
                    ),
                    *cases_for(
                        spec, lengths=LENGTHS, head_dims=(128,), groups=(1,), dtypes=(main,), all_params=False
                    ),
                ]
            out += [(name, backend.name, c) for c in cases]
            # every parameter set, and every dtype, on one self and one cross shape
            lowp = (torch.bfloat16, torch.float16) if ON_CUDA or backend.name != "flex" else (torch.bfloat16,)
            small = ((17, 17), (9, 30)) if interp else ((130, 130), (70, 200))
            extra = cases_for(
                spec,
                lengths=small,
                head_dims=(32 if interp else 64,),
                groups=(2,),
                dtypes=(torch.float32, *lowp),
                heads=4,
                batch=2,
            )
            out += [(name, backend.name, c) for c in extra]
    return out


CASES = _cases()


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
    if spec.backward and attnlab.get(method).backend(backend).backward:
        # the backward must have been checked wherever the backend can run with gradients
        assert "dq" in check.errors or not ON_CUDA, f"{backend} did not check gradients on CUDA"
