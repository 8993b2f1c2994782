"""The ``triton`` backend of sigmoid attention: attnlab's FlashSigmoid kernels (forward + backward)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

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
            from attnlab.kernels.sigmoid.op import sigmoid_fwd

            bias, causal = float(self.bias_of(call)), call.problem.causal
            scale = float(call.scale)
            fn = lambda q, k, v: sigmoid_fwd(q, k, v, scale, bias, causal)
            call.memo["sigmoid"] = fn
        return fn(q, k, v)
