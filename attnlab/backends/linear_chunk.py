"""Backends of the linear family (``attnlab/catalog/linear``): chunked executors that carry the state.

- ``torch_chunk``: the chunked parallel form in plain PyTorch (``attnlab.kernels.linear.naive``), exact,
  float32 accumulation; any device, backward by autograd. The CPU path.
- ``triton``: attnlab's chunked Triton kernels (``attnlab.kernels.linear.op``), forward and backward,
  with the recurrent step kernel for one-token decode; GPU, or CPU under ``TRITON_INTERPRET=1``.

Each method gives the backend a runner ``(q, k, v, call, extra, state) -> (out, state)`` (its feature maps,
gates and state layout), and, for Triton, the refusals specific to it (chunk sizes, head dims).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.core import ALL_PATTERNS, Pattern
from attnlab.kernels.triton_utils import triton_refusal

Runner = Callable[[Tensor, Tensor, Tensor, Call, Mapping[str, Tensor], Any], tuple[Tensor, Any]]
Refusal = Callable[[Call], list[str]]

_OP_MODULE = "attnlab.kernels.linear.op"


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class LinearBackend(Backend):
    """A stateful backend of one linear method: ``run_state`` runs the method's runner."""

    #: a Triton kernel (on a CPU it runs only in Triton's interpreter: tests give it tiny shapes)
    triton: bool = False

    def __init__(
        self,
        name: str,
        summary: str,
        caps: Capabilities,
        runner: Runner,
        refusal: Refusal | None = None,
        *,
        triton: bool = False,
    ) -> None:
        self.triton = triton
        self.name = name
        self.summary = summary
        self.caps = caps
        self.runner = runner
        self.refusal = refusal

    def reasons(self, call: Call) -> list[str]:
        return self.refusal(call) if self.refusal is not None else []

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        return self.runner(q, k, v, call, extra, state)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self.run_state(q, k, v, call, extra, None)[0]


def torch_chunk(runner: Runner, refusal: Refusal | None = None) -> LinearBackend:
    """The plain-PyTorch chunked backend of a method (``refusal``: the method's own limits that depend on
    its parameters, e.g. based's head-dim limit under the Taylor mixer)."""
    return LinearBackend(
        "torch_chunk",
        "the chunked parallel form in plain PyTorch (exact, fp32 accumulation; autograd backward)",
        Capabilities(stateful=True),
        runner,
        refusal,
    )


def _triton_reasons(extra: Refusal | None) -> Refusal:
    def reasons(call: Call) -> list[str]:
        why = triton_refusal(call.problem.device, _imported_interpreted())
        out = [why] if why else []
        return out + (extra(call) if extra is not None else [])

    return reasons


def triton_chunk(
    runner: Runner,
    refusal: Refusal | None = None,
    *,
    backward: bool = True,
    patterns: frozenset[Pattern] = ALL_PATTERNS,
) -> LinearBackend:
    """The Triton chunked backend of a method (``refusal``: its own limits, e.g. chunk sizes; ``patterns``:
    the patterns its kernels run, when fewer than the method defines)."""
    return LinearBackend(
        "triton",
        "attnlab's chunked Triton kernels, state in/out (CPU only under TRITON_INTERPRET=1)",
        Capabilities(
            stateful=True, backward=backward, patterns=patterns, where="GPU; CPU via Triton's interpreter"
        ),
        runner,
        _triton_reasons(refusal),
        triton=True,
    )
