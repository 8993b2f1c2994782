"""``attnlab verify``: every backend of every method against its reference, on this device.

Per method, backend and supported pattern: a self shape (N=257) and a cross shape (N_q=63, N_k=257),
head dim 64, GQA 2:1, every parameter set of ``test_params``; forward, and backward where the backend
can run with gradients. On CUDA in bfloat16 and float32; on CPU in float32. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) gets tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

import attnlab
from attnlab.testing import Case, Check, cases_for, check_parity


def verify_cases(
    device: torch.device, methods: tuple[str, ...] | None = None
) -> Iterator[tuple[str, str, Case]]:
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    for name, spec in attnlab.methods().items():
        if methods is not None and name not in methods:
            continue
        for backend in spec.backends:
            tiny = device.type == "cpu" and backend.name == "triton"
            lengths = ((17, 17), (9, 30)) if tiny else ((257, 257), (63, 257))
            for case in cases_for(
                spec,
                lengths=lengths,
                head_dims=(32 if tiny else 64,),
                groups=(2,),
                dtypes=dtypes,
                heads=4,
                batch=2,
            ):
                yield name, backend.name, case


def verify(
    device: torch.device,
    methods: tuple[str, ...] | None = None,
    progress: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Run every case; a Check per (method, backend, case), skipped ones carrying the backend's refusal."""
    results = []
    for name, backend, case in verify_cases(device, methods):
        try:
            check = check_parity(attnlab.get(name), backend, case, device)
        except Exception as e:  # recorded as a failure with its message, not a crash of the whole run
            check = Check(name, backend, case, crash=f"{type(e).__name__}: {str(e)[:300]}")
        results.append(check)
        if progress:
            progress(check)
    return results
