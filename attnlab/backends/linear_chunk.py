"""Backends of the linear family (``attnlab/catalog/linear``): chunked executors that carry the state.

- ``torch_chunk``: the chunked parallel form in plain PyTorch (``attnlab.kernels.linear.naive``), exact,
  float32 accumulation; any device, backward by autograd. The CPU path.
- ``triton``: attnlab's chunked Triton kernels (``attnlab.kernels.linear.op``), forward and backward,
  with the recurrent step kernel for one-token decode; GPU, or CPU under ``TRITON_INTERPRET=1``.

Each method gives the backend a runner ``(q, k, v, call, extra, state) -> (out, state)`` (its feature maps,
gates and state layout), and, for Triton, the refusals specific to it (chunk sizes, head dims). A method
whose kernels have op-level varlen (``gla_chunk_varlen``, ``delta_chunk_varlen``) also gives its Triton
backend a packed runner ``(q, k, v, call, extra, cu_seqlens) -> (out, final states (S, H, K, V))``: the
backend then declares ``varlen`` and runs packed sequences (``cu_seqlens_q``) in one launch, each from the
initial state (:meth:`LinearBackend.run_varlen_state`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.core import ALL_PATTERNS, Params, Pattern
from attnlab.kernels.triton_utils import triton_refusal

Runner = Callable[[Tensor, Tensor, Tensor, Call, Mapping[str, Tensor], Any], tuple[Tensor, Any]]
Refusal = Callable[[Call], list[str]]
#: ``(params, dtype) -> reasons``: refusals by design that depend on the parameters and the dtype alone
DtypeRefusal = Callable[[Params, torch.dtype], list[str]]
#: ``(q, k, v, call, extra, cu_seqlens) -> (out (1, H, T, V), final states (S, H, K, V))``: packed sequences
#: (q (1, H, T, D), k, v (1, H_kv, T, .), tensor inputs packed along their token axes, ``cu_seqlens``
#: (S + 1,) int32 on q's device), each sequence from the initial state.
VarlenRunner = Callable[[Tensor, Tensor, Tensor, Call, Mapping[str, Tensor], Tensor], tuple[Tensor, Tensor]]

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
        varlen: VarlenRunner | None = None,
        dtype_refusal: DtypeRefusal | None = None,
    ) -> None:
        self.triton = triton
        self.dtype_refusal = dtype_refusal
        self.varlen_runner = varlen
        self.name = name
        self.summary = summary
        self.caps = caps
        self.runner = runner
        self.refusal = refusal

    def reasons(self, call: Call) -> list[str]:
        return self.refusal(call) if self.refusal is not None else []

    def dtype_refusals(self, params: Params, dtype: torch.dtype) -> list[str]:
        return self.dtype_refusal(params, dtype) if self.dtype_refusal is not None else []

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        return self.runner(q, k, v, call, extra, state)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self.run_state(q, k, v, call, extra, None)[0]

    def run_varlen_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, list[Any]]:
        """Packed sequences (``call.packing``; self-attention, as every linear method: the API refuses a
        packing whose queries and keys differ in a sequence, so ``cu_q`` is the packing) in
        one launch of the method's packed runner, each sequence from the initial state: (out (1, H, T, V),
        each sequence's final state (1, H, K, V) float32, None for an empty sequence)."""
        pk = call.packing
        if self.varlen_runner is None or pk is None:
            raise NotImplementedError(f"backend {self.name} of this method cannot run packed sequences")
        cu = torch.tensor(pk.cu_q, dtype=torch.int32, device=q.device)
        out, final = self.varlen_runner(q, k, v, call, extra, cu)
        states: list[Any] = [
            None if pk.cu_q[s + 1] == pk.cu_q[s] else final[s : s + 1] for s in range(pk.count)
        ]
        return out, states


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
    varlen: VarlenRunner | None = None,
    dtype_refusal: DtypeRefusal | None = None,
) -> LinearBackend:
    """The Triton chunked backend of a method (``refusal``: its own limits, e.g. chunk sizes; ``patterns``:
    the patterns its kernels run, when fewer than the method defines; ``varlen``: its packed runner, when
    its kernels have op-level varlen: the backend then declares ``varlen``; ``dtype_refusal``: its
    refusals by design of a parameter set in a dtype, which the parity cases leave out)."""
    return LinearBackend(
        "triton",
        "attnlab's chunked Triton kernels, state in/out (CPU only under TRITON_INTERPRET=1)",
        Capabilities(
            stateful=True,
            backward=backward,
            patterns=patterns,
            varlen=varlen is not None,
            where="GPU; CPU via Triton's interpreter",
        ),
        runner,
        _triton_reasons(refusal),
        triton=True,
        varlen=varlen,
        dtype_refusal=dtype_refusal,
    )
