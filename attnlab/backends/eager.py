"""Plain-PyTorch backends: ``eager`` (the method's math in the input dtype, dense) and ``reference``
(the fp32 reference itself; only when forced with ``backend="reference"``)."""

from __future__ import annotations

from torch import Tensor

from attnlab.backends.base import OK, Backend, Call, Verdict
from attnlab.settings import settings


def _size_refusal(name: str, call: Call) -> Verdict:
    elements = call.problem.dense_elements
    if elements > settings.max_dense_elements:
        fast = ", ".join(b.name for b in call.spec.backends if b.name not in ("eager", "sdpa_mask"))
        return False, (
            f"{name} would materialise {elements:,} score elements (B*H*N_q*N_k), above "
            f"attnlab.settings.max_dense_elements={settings.max_dense_elements:,}; use {fast or 'a fast backend'}"
        )
    return OK


class EagerBackend(Backend):
    name = "eager"
    summary = "the method's math in plain PyTorch at the input precision (dense, O(N^2) memory)"

    def can_use(self, call: Call) -> Verdict:
        return _size_refusal(self.name, call)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return call.spec.reference(
            q, k, v, call.params, causal=call.problem.causal, scale=call.scale, upcast=False
        )


class ReferenceBackend(Backend):
    name = "reference"
    summary = "the fp32 reference (the specification; slow, dense)"

    def can_use(self, call: Call) -> Verdict:
        return _size_refusal(self.name, call)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return call.spec.reference(q, k, v, call.params, causal=call.problem.causal, scale=call.scale)


EAGER = EagerBackend()
REFERENCE = ReferenceBackend()
