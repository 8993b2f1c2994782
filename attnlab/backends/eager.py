"""Plain-PyTorch backends: ``eager`` (the method's math in the input dtype, dense) and ``reference``
(the fp32 reference itself; only when forced with ``backend="reference"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities, dense_size_reasons
from attnlab.errors import BackendError
from attnlab.masks import causal_mask, mask_for
from attnlab.plans import Plan, static_plan
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
        if call.want_lse and not call.spec.has_lse:
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

    def plan_for(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Plan | None:
        """The plan of a method whose sparsity its backends define (no ``mask``, no estimator, e.g.
        strided_heads' per-head mask): what its backends execute (:func:`_backends_plan`); None for the
        others (the caller takes the static or estimated plan)."""
        spec = call.spec
        if spec.mask is not None or spec.estimate is not None:
            return None
        return _backends_plan(q, k, call, extra)

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The reference output and its log-sum-exp, float32 (B, H, N_q), -inf for rows with no key.

        A method with ``reference_lse`` (the softmax variants: a normaliser over transformed logits, a
        sink's term) gives its own, the tensor inputs in ``extra`` passed to it. Otherwise ``lse = log
        sum_j exp(scale q_i . k_j)`` over the pairs the method allows (its plan's dense mask: estimated,
        static, or the plan its backends execute for a method whose sparsity they define, e.g. a per-head
        mask; else the causal mask). A method outside the dense family with neither kind of plan is
        refused: its reference masks in a way the log-sum-exp cannot follow."""
        spec = call.spec
        if spec.reference_lse is not None:
            out, lse = spec.reference_lse(
                q, k, v, call.params, causal=call.problem.causal, scale=call.scale, **extra
            )
            return out, lse
        out = self.run(q, k, v, call, extra)
        p = call.problem
        mask: Tensor | None
        if spec.estimate is not None:
            mask = spec.estimate_plan(q, k, call, extra).dense_mask()
        elif spec.mask is not None:
            mask = static_plan(spec, call.params, p.n_q, p.n_k, p.causal, p.device).dense_mask()
        elif (plan := _backends_plan(q, k, call, extra)) is not None:
            mask = plan.dense_mask()
        elif spec.family != "dense":
            raise BackendError(
                f"backend 'reference' cannot return the log-sum-exp of method {spec.name!r} (family "
                f"{spec.family!r}): the method has no mask, no estimator, and none of its backends "
                f"({', '.join(b.name for b in spec.backends) or 'none'}) reports a plan, so the pairs its "
                "reference keeps are unknown here; expected a method with one of these, or call without "
                "return_lse"
            )
        else:
            mask = mask_for(causal_mask, None, p.n_q, p.n_k, True, p.device) if p.causal else None
        s = scores(q, k, call.scale, upcast=True)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return out, torch.logsumexp(s, dim=-1)


def _backends_plan(q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Plan | None:
    """The plan the first of the method's backends reports for ``call`` (None when none does: a dense
    method). A method without ``mask`` or estimator whose backends run a plan defines its sparsity there
    (strided_heads: the per-head plan of its mask); the reference's log-sum-exp and ``return_plan`` use it
    as the other backends do."""
    for backend in call.spec.backends:
        plan = backend.plan_for(q, k, call, extra)
        if isinstance(plan, Plan):
            return plan
    return None


EAGER = EagerBackend()
REFERENCE = ReferenceBackend()
