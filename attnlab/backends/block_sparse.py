"""The ``block_sparse`` backend: attnlab's Triton executor running the call's sparsity plan (fwd + bwd).

Static plans (mask methods) are made once per call signature: the plan's executor tables are kept in
``call.memo``, so a repeated call does no host work beyond the launch. Dynamic plans are estimated on every
call, through :meth:`~attnlab.core.MethodSpec.estimate_plan` (the estimator gets the tensor inputs it
declares, e.g. a learned gate's weights). A dense softmax method (no plan, no tensor inputs) runs as the
dense plan, so the executor can serve plain softmax too (packed sequences above all).

Packed sequences (``cu_seqlens``, :meth:`run_varlen`): each sequence's plan in its own coordinates (the
static plan at its lengths, the estimator on its own q and k, or dense) joined into one block-diagonal
plan, one launch (:func:`attnlab.backends.varlen.block_sparse_packed`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.kernels.triton_utils import triton_refusal
from attnlab.plans import Plan, static_plan
from attnlab.plans.executor import executor_tables, varlen_plan

_OP_MODULE = "attnlab.kernels.block_sparse.op"
#: Plan tiles (query rows x key columns) of the executor on a GPU, and on a CPU (interpreted).
TILE = 128
CPU_TILE = 32
_NO_EXTRA: Mapping[str, Tensor] = {}


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


def _tile(call: Call) -> int:
    return CPU_TILE if call.problem.device.type == "cpu" else TILE


#: Why the executor refuses a static (mask-defined) method's call traced by ``torch.compile``: its tables
#: are built from the plan with data-dependent sizes (``nonzero``), which dynamo cannot trace with
#: ``fullgraph=True`` (found on the H100, where the executor is a static method's default: neighborhood
#: under compile, session 19); such a call takes the method's FlexAttention backend, which traces. A dynamic
#: method's call is not refused: its other backend is dense (``sdpa_mask``), so dynamo keeps the executor
#: through a graph break (not with ``fullgraph=True``).
COMPILE_REFUSAL = (
    "inside torch.compile: the executor's tables are built from the plan with data-dependent sizes, which "
    "torch.compile cannot trace; this static method's FlexAttention backend runs the call instead"
)


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
        varlen=True,
        where="GPU; CPU via Triton's interpreter",
    )

    def reasons(self, call: Call) -> list[str]:
        out = []
        why = triton_refusal(call.problem.device, _imported_interpreted())
        if why:
            out.append(why)
        if torch.compiler.is_compiling() and call.spec.estimate is None:
            out.append(COMPILE_REFUSAL)
        spec = call.spec
        generic = type(self).plan is BlockSparseBackend.plan  # a subclass with its own plan() has one
        if spec.plan_kind is None and generic and (not spec.softmax_normalized or spec.inputs):
            out.append(
                f"runs softmax attention over a plan; method {spec.name!r} has no plan and is not plain "
                "softmax attention (its weights are not softmax-normalised, or it takes tensor inputs)"
            )
        return out

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Plan | None:
        """A dynamic method's plan from its estimator (without tensor inputs: :meth:`plan_for` passes
        them); a static method's plan in 128 x 128 tiles (32 x 32 on a CPU, where the kernels run in
        Triton's interpreter and small tiles keep tests quick); None for a dense method."""
        p = call.problem
        if call.spec.estimate is not None:
            plan: Plan = call.spec.estimate(q, k, call.params, causal=p.causal, scale=call.scale)
            return plan
        if call.spec.mask is None:
            return None
        return static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device, _tile(call))

    def plan_for(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Plan | None:
        """:meth:`plan`, a dynamic method's estimator given the tensor inputs it declares
        (``estimate_inputs``, e.g. seer's gate weights)."""
        if call.spec.estimate is not None and type(self).plan is BlockSparseBackend.plan:
            plan: Plan = call.spec.estimate_plan(q, k, call, extra)
            return plan
        return self.plan(q, k, call)

    def _tables(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> tuple[Any, bool]:
        """(the executor's tables, the causal flag to launch with) for ``call``."""
        plan = self.plan_for(q, k, call, extra)
        if plan is None:  # dense: the one-sequence block-diagonal plan (causality in its rule)
            p = call.problem
            plan = varlen_plan([0, p.n_q], [0, p.n_k], [None], p.causal, _tile(call), p.device)
            return executor_tables(plan).as_args(), False
        return executor_tables(plan).as_args(), call.problem.causal

    def _fn(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]):  # type: ignore[no-untyped-def]
        from attnlab.kernels.block_sparse.op import block_sparse_attention

        if call.spec.estimate is not None:  # a new plan for every call
            tables, causal = self._tables(q, k, call, extra)
            return lambda q, k, v: block_sparse_attention(q, k, v, tables, call.scale, causal)
        fn = call.memo.get("block_sparse")
        if fn is None:
            tables, causal = self._tables(q, k, call, extra)
            scale = float(call.scale)
            fn = lambda q, k, v: block_sparse_attention(q, k, v, tables, scale, causal)
            call.memo["block_sparse"] = fn
        return fn

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self._fn(q, k, call, extra)(q, k, v)[0]

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        out, lse = self._fn(q, k, call, extra)(q, k, v)
        return out, lse

    # -- packed sequences ---------------------------------------------------------------------------
    def varlen_plans(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> list[Any]:
        """Each sequence's plan in its own coordinates: :meth:`plan_for` on the sequence alone (its q, k
        and the tensor inputs cut to it); None for an empty sequence or a dense method."""
        from attnlab.backends.varlen import sequence_inputs

        pk = call.packing
        assert pk is not None, "varlen_plans needs a packed call"
        plans: list[Any] = []
        for s in range(pk.count):
            q0, q1, k0, k1 = pk.bounds(s)
            if q1 == q0 or k1 == k0:
                plans.append(None)
                continue
            one = replace(
                call, problem=replace(call.problem, n_q=q1 - q0, n_k=k1 - k0), packing=None, memo={}
            )
            xs = sequence_inputs(call.spec.inputs, extra, pk, s) if extra else _NO_EXTRA
            plans.append(self.plan_for(q[:, :, q0:q1], k[:, :, k0:k1], one, xs))
        return plans

    def run_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Packed sequences in one launch: the sequences' plans (:meth:`varlen_plans`; static ones made
        once per packing and kept in ``call.memo``) joined block-diagonally. Dynamic plans in other tiles
        than their siblings' or with token columns (vertical_slash) run sequence by sequence on the
        executor instead (:func:`~attnlab.backends.varlen.block_sparse_packed`)."""
        from attnlab.backends.varlen import block_sparse_packed, packed_tables

        pk = call.packing
        assert pk is not None, "run_varlen needs a packed call"
        causal = call.problem.causal
        kept = None if call.spec.estimate is not None else call.memo.get("block_sparse_varlen")
        if kept is None:
            plans = self.varlen_plans(q, k, call, extra)
            blocks = {p.block_q for p in plans if p is not None}
            block = blocks.pop() if len(blocks) == 1 else _tile(call)
            kept = (plans, block, packed_tables(pk, plans, causal, block, q.device))
            if call.spec.estimate is None:  # static and dense plans: once per packing
                call.memo["block_sparse_varlen"] = kept
        plans, block, tables = kept
        out, lse = block_sparse_packed(
            q, k, v, pk, plans, causal=causal, scale=call.scale, block=block, tables=tables
        )
        return out, lse


BLOCK_SPARSE = BlockSparseBackend()
