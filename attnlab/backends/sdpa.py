"""PyTorch SDPA backends: ``sdpa`` (dense softmax, fastest SDPA kernel first) and ``sdpa_mask``
(softmax with the method's plan, static or estimated, materialised as a dense boolean mask: the plain
fallback)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities, dense_size_reasons
from attnlab.kernels.sdpa import sdpa_dense, sdpa_masked
from attnlab.plans import static_plan


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch SDPA (cuDNN, flash, mem-efficient or math: the fastest that takes the inputs)"
    caps = Capabilities()

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return sdpa_dense(q, k, v, causal=call.problem.causal, scale=call.scale)


class SdpaMaskBackend(Backend):
    name = "sdpa_mask"
    summary = "torch SDPA with the plan as a dense (N_q, N_k) boolean mask (plain fallback, O(N^2) memory)"
    caps = Capabilities(plan_kinds=frozenset({"static", "dynamic"}))

    def reasons(self, call: Call) -> list[str]:
        p = call.problem
        return dense_size_reasons(self.name, call, p.n_q * p.n_k + p.dense_elements)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        if call.spec.estimate is not None:  # a dynamic plan: estimated for every call, (B|1, H|1, N_q, N_k)
            plan = call.spec.estimate_plan(q, k, call, extra)
            return sdpa_masked(q, k, v, mask=plan.dense_mask(), scale=call.scale)
        mask = call.memo.get("dense_mask")
        if mask is None:
            p = call.problem
            mask = static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device).dense_mask()[0, 0]
            call.memo["dense_mask"] = mask
        return sdpa_masked(q, k, v, mask=mask, scale=call.scale)
