"""The ``block_sparse`` backend: attnlab's Triton executor running the call's sparsity plan (fwd + bwd).

Static plans (mask methods) are made once per call signature: the plan's executor tables are kept in
``call.memo``, so a repeated call does no host work beyond the launch.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.kernels.triton_utils import triton_refusal
from attnlab.plans import Plan, static_plan
from attnlab.plans.executor import executor_tables

_OP_MODULE = "attnlab.kernels.block_sparse.op"
#: Plan tiles (query rows x key columns) of the executor on a GPU, and on a CPU (interpreted).
TILE = 128
CPU_TILE = 32


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class BlockSparseBackend(Backend):
    name = "block_sparse"
    triton = True
    summary = "attnlab's block-sparse Triton executor over the call's plan (fwd + bwd; CPU only interpreted)"
    caps = Capabilities(
        min_head_dim=16,
        max_head_dim=256,
        same_v_dim=True,
        lse=True,
        plan_kinds=frozenset({"static", "dynamic"}),
        where="GPU; CPU via Triton's interpreter",
    )

    def reasons(self, call: Call) -> list[str]:
        why = triton_refusal(call.problem.device, _imported_interpreted())
        return [why] if why else []

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Plan | None:
        """A dynamic method's plan from its estimator; a static method's plan in 128 x 128 tiles (32 x 32
        on a CPU, where the kernels run in Triton's interpreter and small tiles keep tests quick)."""
        p = call.problem
        if call.spec.estimate is not None:
            plan: Plan = call.spec.estimate(q, k, call.params, causal=p.causal, scale=call.scale)
            return plan
        block = CPU_TILE if p.device.type == "cpu" else TILE
        return static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device, block)

    def _fn(self, q: Tensor, k: Tensor, call: Call):  # type: ignore[no-untyped-def]
        if call.spec.estimate is not None:  # a new plan for every call
            from attnlab.kernels.block_sparse.op import block_sparse_attention

            tables = executor_tables(self.plan(q, k, call)).as_args()  # type: ignore[arg-type]
            return lambda q, k, v: block_sparse_attention(q, k, v, tables, call.scale, call.problem.causal)
        fn = call.memo.get("block_sparse")
        if fn is None:
            from attnlab.kernels.block_sparse.op import block_sparse_attention

            tables = executor_tables(self.plan(q, k, call)).as_args()  # type: ignore[arg-type]
            scale, causal = float(call.scale), call.problem.causal
            fn = lambda q, k, v: block_sparse_attention(q, k, v, tables, scale, causal)
            call.memo["block_sparse"] = fn
        return fn

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self._fn(q, k, call)(q, k, v)[0]

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        out, lse = self._fn(q, k, call)(q, k, v)
        return out, lse


BLOCK_SPARSE = BlockSparseBackend()
