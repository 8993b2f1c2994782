"""The ``triton`` backend of sigmoid attention: attnlab's FlashSigmoid kernels (forward + backward)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.kernels.triton_utils import triton_refusal

_OP_MODULE = "attnlab.kernels.sigmoid.op"


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class TritonSigmoidBackend(Backend):
    name = "triton"
    triton = True
    summary = "attnlab's FlashSigmoid Triton kernels (fwd + bwd; CPU only under TRITON_INTERPRET=1)"
    caps = Capabilities(max_head_dim=256, same_v_dim=True, where="GPU; CPU via Triton's interpreter")

    def __init__(self, bias_of: Callable[[Call], float]) -> None:
        self.bias_of = bias_of

    def reasons(self, call: Call) -> list[str]:
        why = triton_refusal(call.problem.device, _imported_interpreted())
        return [why] if why else []

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        fn = call.memo.get("sigmoid")
        if fn is None:
            fn = self._launcher(call)
            if not torch.compiler.is_compiling():
                call.memo["sigmoid"] = fn
        return fn(q, k, v)

    def _launcher(self, call: Call) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The call's forward with its scalars bound: the ``attnlab::sigmoid_fwd`` custom op where autograd
        or ``torch.compile`` needs it (an input requires grad with grad enabled, or inside a trace), else the
        Triton launcher directly. The custom op's dispatch (autograd wrapper, schema checks) cost about
        35 us per call on the H100's host (benchmarks/results/h100-2026-11-22/session4/NOTES.md, section
        2), a quarter of a small call; the output is the same launch either way."""
        from attnlab.kernels.sigmoid.op import sigmoid_fwd, sigmoid_fwd_launch

        bias, causal, scale = float(self.bias_of(call)), call.problem.causal, float(call.scale)
        is_compiling, grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled

        def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if is_compiling() or (grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
                return sigmoid_fwd(q, k, v, scale, bias, causal)
            return sigmoid_fwd_launch(q, k, v, scale, bias, causal)

        return fn
