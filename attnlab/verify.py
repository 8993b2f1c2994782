"""``attnlab verify``: every backend of every method against its reference, on this device.

Per method, backend and supported pattern: a self shape (N=257) and a cross shape (N_q=63, N_k=257),
head dim 64, GQA 2:1, every parameter set of ``test_params``; forward, and backward where the backend
can run with gradients. On CUDA in bfloat16 and float32, plus the benchmark's timed configuration
(:func:`timed_cases`: N=8192, D=128, bf16, every timed budget, through the autotuned path); on CPU in
float32. Triton's CPU interpreter (``TRITON_INTERPRET=1``) gets tiny shapes. A backend that refuses a
case gives a skipped Check, counted as skipped (never as passed).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

import attnlab
from attnlab.patterns import pattern_of
from attnlab.testing import Case, Check, cases_for, check_parity

#: Decode-shaped (N_q, N_k) of the decode methods' cases, beside the prefill shapes (which some of them
#: refuse: a query bound, ``Params.check_lengths``).
DECODE_LENGTHS = ((1, 41), (4, 300))


def verify_cases(
    device: torch.device, methods: tuple[str, ...] | None = None
) -> Iterator[tuple[str, str, Case]]:
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    for name, spec in attnlab.methods().items():
        if methods is not None and name not in methods:
            continue
        for backend in spec.backends:
            tiny = device.type == "cpu" and backend.triton
            lengths: tuple[tuple[int, int], ...] = ((17, 17), (9, 30)) if tiny else ((257, 257), (63, 257))
            if spec.family == "decode":  # a few queries against a longer cache, as decoding calls them
                lengths += DECODE_LENGTHS
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
            if device.type == "cuda":
                for case in timed_cases(spec):
                    yield name, backend.name, case


#: The configuration the GPU benchmark times (bf16, head dim 128, self-attention at 8K and beyond), checked
#: at its shortest long length through the same autotuned path: attnlab's kernels pick one schedule for
#: every length >= 8K (the long-sequence bucket), so a check at 8192 covers the schedule timed at 8K-64K.
TIMED_LENGTH = 8192
TIMED_HEAD_DIM = 128


def timed_cases(spec: attnlab.MethodSpec) -> Iterator[Case]:
    """Cases at the benchmark's timed configuration: N = TIMED_LENGTH, D = 128, bf16, causal and not, with
    every parameter set the benchmark times there (``bench_params``); B=1, 2 heads (the reference's N x N
    fp32 scores must fit in memory)."""
    for causal in (False, True):
        if pattern_of(causal, TIMED_LENGTH, TIMED_LENGTH) not in spec.patterns:
            continue
        for params in spec.distinct_bench_params(TIMED_LENGTH):
            yield Case(1, 2, 2, TIMED_LENGTH, TIMED_LENGTH, TIMED_HEAD_DIM, torch.bfloat16, causal, params)


def _run_case(name: str, backend: str, case: Case, device: torch.device) -> Check:
    try:
        return check_parity(attnlab.get(name), backend, case, device)
    except Exception as e:  # recorded as a failure with its message, not a crash of the whole run
        return Check(name, backend, case, crash=f"{type(e).__name__}: {str(e)[:300]}")
    finally:  # workers share the GPU: give back what the case's N x N reference held
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _unit(name: str, backend: str, case: Case) -> tuple[str, str, str, str]:
    """A worker's share of the cases: one (method, backend, dtype, pattern)."""
    return name, backend, str(case.dtype), case.pattern.value


def _run_unit(device: str, unit: tuple[str, str, str, str]) -> list[Check]:
    dev = torch.device(device)
    return [_run_case(*nbc, dev) for nbc in verify_cases(dev, (unit[0],)) if _unit(*nbc) == unit]


def verify(
    device: torch.device,
    methods: tuple[str, ...] | None = None,
    progress: Callable[[Check], None] | None = None,
    jobs: int = 1,
) -> list[Check]:
    """Run every case; a Check per (method, backend, case), skipped ones carrying the backend's refusal.

    ``jobs > 1`` spreads the (method, backend, dtype, pattern) groups over that many fresh processes (compiling and
    autotuning are most of the time on a GPU). Results come back in case order either way.
    """
    cases = list(verify_cases(device, methods))
    if jobs <= 1:
        results = []
        for name, backend, case in cases:
            results.append(_run_case(name, backend, case, device))
            if progress:
                progress(results[-1])
        return results
    units = list(dict.fromkeys(_unit(*nbc) for nbc in cases))
    done: dict[tuple[str, str, str, str], list[Check]] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_unit, str(device), unit): unit for unit in units}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                checks = future.result()
            except Exception as e:  # the worker died (e.g. a device fault): its cases fail, the rest stand
                crash = f"worker died: {type(e).__name__}: {str(e)[:300]}"
                checks = [Check(*nbc, crash=crash) for nbc in cases if _unit(*nbc) == unit]
            done[unit] = checks
            for check in checks:
                if progress:
                    progress(check)
    return [check for unit in units for check in done[unit]]
