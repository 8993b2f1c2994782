"""Process-wide knobs. Plain attributes; change them in code. Two are read from the environment when
attnlab is imported (``ATTNLAB_CHECK_FINITE``, ``ATTNLAB_CHECK_VALUES``); nothing is ever written to it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    #: Largest number of score-matrix elements (batch x heads x N_q x N_k) that a dense path (the
    #: reference, the ``eager`` and ``sdpa_mask`` backends) may materialise. 2**28 elements is 1 GiB
    #: in fp32. Above it those paths refuse with a message naming the fast backend to use.
    max_dense_elements: int = 2**28
    #: Query rows per chunk when a mask is evaluated (plan building, density counting).
    mask_chunk_elements: int = 2**24
    #: Autotune attnlab's Triton kernels per (head dim, causal, length bucket, ...). False uses each
    #: kernel's first config (tests do this: fewer compilations, same results).
    autotune: bool = True
    #: Scan q, k, v (and tensor inputs) for NaN/Inf on every call and raise a clear error. A debugging
    #: aid: it costs a reduction per tensor and a host synchronisation per call, so it is off unless
    #: set here, passed per call (``check_finite=True``) or set by ``ATTNLAB_CHECK_FINITE=1``.
    check_finite: bool = field(default_factory=lambda: _env_flag("ATTNLAB_CHECK_FINITE"))
    #: Check the values of inputs whose range a method defines (the linear family's log-decays <= 0 and
    #: finite beta, lightning's decays in (0, 1], linear's feature-map weights free of NaN), with clear
    #: errors. It costs one host synchronisation per call (a reduction of each such input before the call;
    #: on a Triton decode step of gla / gated_delta, <= 8 tokens without gradients, the step kernel counts
    #: bad g and beta itself and the host reads the count once after the launch), so a decode loop that
    #: knows its gates are valid may turn it off
    #: here or with ``ATTNLAB_CHECK_VALUES=0``; on by default. (Skipped inside torch.compile and CUDA-graph
    #: capture in any case.)
    check_values: bool = field(
        default_factory=lambda: (
            os.environ.get("ATTNLAB_CHECK_VALUES", "1").strip().lower() not in ("0", "false", "no", "off")
        )
    )
    #: Bumped on every change of a setting, so prepared ops re-resolve their cached dispatch.
    generation: int = 0

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name not in _PER_CALL:  # settings read on every call do not change a resolved dispatch
            object.__setattr__(self, "generation", getattr(self, "generation", 0) + 1)


#: read at every call, never part of a resolved call: changing them keeps prepared ops (and CUDA graphs) valid
_PER_CALL = frozenset({"generation", "check_finite", "check_values"})

settings = Settings()
