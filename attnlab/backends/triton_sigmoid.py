"""The ``triton`` backend of sigmoid attention: attnlab's FlashSigmoid kernels (forward + backward)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import Tensor

from attnlab.backends.base import OK, Backend, Call, Verdict
from attnlab.kernels.triton_utils import triton_refusal

_OP_MODULE = "attnlab.kernels.sigmoid.op"


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class TritonSigmoidBackend(Backend):
    name = "triton"
    summary = "attnlab's FlashSigmoid Triton kernels (fwd + bwd; CPU only under TRITON_INTERPRET=1)"
    where = "GPU; CPU via Triton's interpreter"

    def __init__(self, bias_of: Callable[[Call], float]) -> None:
        self.bias_of = bias_of

    def can_use(self, call: Call) -> Verdict:
        p = call.problem
        why = triton_refusal(p.device, _imported_interpreted())
        if why:
            return False, why
        if p.head_dim != p.v_dim:
            return False, f"the Triton kernel needs D_v == D, got D={p.head_dim}, D_v={p.v_dim}"
        if p.head_dim > 256:
            return False, f"the Triton kernel takes head dims up to 256, got {p.head_dim}"
        return OK

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        from attnlab.kernels.sigmoid.op import sigmoid_attention

        return sigmoid_attention(q, k, v, call.scale, self.bias_of(call), call.problem.causal)
