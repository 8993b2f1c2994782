"""The ``flex`` backend: FlexAttention running the call's sparsity plan as a BlockMask.

Softmax methods pass their plan; methods whose weights are not softmax-normalised (sigmoid) pass a
``score_mod`` giving log-weights and set ``unnormalized``: FlexAttention then returns
``O' = sum_j w_ij v_j / sum_j w_ij`` and ``lse_i = log sum_j w_ij``, and ``O = O' * exp(lse)`` recovers
``sum_j w_ij v_j`` exactly (rows with no allowed key: lse = -inf, O = 0).

What a call needs besides the tensors (its plan's BlockMask, the score_mod's captured values) is made once
per call signature and kept in ``call.memo``, so a repeated call does no host work beyond the launch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.kernels import flex as flex_exec
from attnlab.plans import Plan, causal_plan, static_plan

ScoreModFactory = Callable[[Call], flex_exec.ScoreMod]


class FlexBackend(Backend):
    name = "flex"
    summary = "FlexAttention (compiled; the plan's BlockMask built once per shape and parameters)"

    def __init__(self, score_mod: ScoreModFactory | None = None, unnormalized: bool = False) -> None:
        self.score_mod = score_mod
        self.unnormalized = unnormalized
        self.caps = Capabilities(
            min_head_dim=16,
            lse=not unnormalized,
            plan_kinds=frozenset({"static"}),
            # compiled CPU FlexAttention cannot return the lse the unnormalised form needs
            where="GPU" if unnormalized else "GPU; CPU forward only",
        )

    def reasons(self, call: Call) -> list[str]:
        p = call.problem
        out = []
        if p.device.type == "cpu":
            if p.requires_grad:
                out.append(
                    "FlexAttention has no backward on CPU (PyTorch raises NotImplementedError); use CUDA"
                )
            if self.unnormalized:
                out.append(
                    "compiled FlexAttention on CPU cannot return the log-sum-exp this method's flex form needs"
                )
            if call.want_lse:
                out.append("compiled FlexAttention on CPU cannot return the log-sum-exp")
            if p.dtype == torch.float16:
                out.append("compiled FlexAttention on CPU does not take float16; use bfloat16 or float32")
        return out

    def _plan(self, call: Call) -> Plan | None:
        """The plan FlexAttention runs: the method's, or the causal one for dense causal calls."""
        p = call.problem
        if call.spec.mask is not None:
            return static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device)
        return causal_plan(p.n_q, p.n_k, p.device) if p.causal else None

    def _kwargs(self, q: Tensor, k: Tensor, call: Call) -> dict[str, Any]:
        kwargs: dict[str, Any] | None = call.memo.get("flex_kwargs")
        if kwargs is None:
            p = call.problem
            plan = self._plan(call)
            kwargs = {
                "block_mask": plan.block_mask() if plan is not None else None,
                "score_mod": self.score_mod(call) if self.score_mod else None,
                "scale": call.scale,
                "options": flex_exec.flex_options(p.n_q, p.n_k, p.group > 1, p.device),
            }
            if not torch.compiler.is_compiling():
                call.memo["flex_kwargs"] = kwargs
        return kwargs

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        if self.unnormalized:
            out, lse = flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call), return_lse=True)
            assert lse is not None
            return (out.float() * torch.exp(lse.float())[..., None]).to(q.dtype)
        return flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call))[0]

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        out, lse = flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call), return_lse=True)
        assert lse is not None
        return out, lse.float()


FLEX = FlexBackend()
