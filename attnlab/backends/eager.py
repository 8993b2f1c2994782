"""Plain-PyTorch backends: ``eager`` (the method's math in the input dtype, dense) and ``reference``
(the fp32 reference itself; only when forced with ``backend="reference"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities, dense_size_reasons
from attnlab.masks import causal_mask, mask_for
from attnlab.plans import static_plan
from attnlab.reference import scores


class EagerBackend(Backend):
    name = "eager"
    summary = "the method's math in plain PyTorch at the input precision (dense, O(N^2) memory)"
    caps = Capabilities(plan_kinds=frozenset({"static"}), stateful=True)

    def reasons(self, call: Call) -> list[str]:
        return dense_size_reasons(self.name, call, call.problem.dense_elements)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return call.spec.reference(
            q, k, v, call.params, causal=call.problem.causal, scale=call.scale, upcast=False, **extra
        )

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        return call.spec.reference(  # type: ignore[return-value]
            q,
            k,
            v,
            call.params,
            causal=call.problem.causal,
            scale=call.scale,
            upcast=False,
            state=state,
            **extra,
        )


class ReferenceBackend(Backend):
    name = "reference"
    summary = "the fp32 reference (the specification; slow, dense)"
    caps = Capabilities(plan_kinds=frozenset({"static", "dynamic"}), stateful=True, lse=True)

    def reasons(self, call: Call) -> list[str]:
        why = dense_size_reasons(self.name, call, call.problem.dense_elements)
        if call.want_lse and not call.spec.softmax_normalized:
            why.append(f"method {call.spec.name!r} is not softmax-normalised: it has no log-sum-exp")
        return why

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return call.spec.reference(
            q, k, v, call.params, causal=call.problem.causal, scale=call.scale, **extra
        )

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        return call.spec.reference(  # type: ignore[return-value]
            q, k, v, call.params, causal=call.problem.causal, scale=call.scale, state=state, **extra
        )

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The reference output, and ``lse = log sum_j exp(scale q_i . k_j)`` over the pairs the method
        allows (its plan's dense mask, or the causal mask), in float32; -inf for rows with no key."""
        out = self.run(q, k, v, call, extra)
        p = call.problem
        mask: Tensor | None
        if call.spec.estimate is not None:
            mask = call.spec.estimate_plan(q, k, call, extra).dense_mask()
        elif call.spec.mask is not None:
            mask = static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device).dense_mask()
        else:
            mask = mask_for(causal_mask, None, p.n_q, p.n_k, True, p.device) if p.causal else None
        s = scores(q, k, call.scale, upcast=True)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return out, torch.logsumexp(s, dim=-1)


EAGER = EagerBackend()
REFERENCE = ReferenceBackend()
