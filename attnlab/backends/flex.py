"""The ``flex`` backend: FlexAttention with the method's mask as a cached BlockMask.

Softmax methods pass their mask; methods whose weights are not softmax-normalised (sigmoid) pass a
``score_mod`` giving log-weights and set ``unnormalized``: FlexAttention then returns
``O' = sum_j w_ij v_j / sum_j w_ij`` and ``lse_i = log sum_j w_ij``, and ``O = O' * exp(lse)`` recovers
``sum_j w_ij v_j`` exactly (rows with no allowed key: lse = -inf, O = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.backends.base import OK, Backend, Call, Verdict
from attnlab.kernels import flex as flex_exec
from attnlab.masks import MaskContext, causal_mask

ScoreModFactory = Callable[[Call], flex_exec.ScoreMod]


class FlexBackend(Backend):
    name = "flex"
    summary = "FlexAttention (compiled; BlockMask cached per shape and parameters)"
    where = "GPU; CPU forward only"

    def __init__(self, score_mod: ScoreModFactory | None = None, unnormalized: bool = False) -> None:
        self.score_mod = score_mod
        self.unnormalized = unnormalized
        if unnormalized:  # compiled CPU FlexAttention cannot return the lse this form needs
            self.where = "GPU"

    def can_use(self, call: Call) -> Verdict:
        p = call.problem
        if p.device.type not in ("cuda", "cpu"):
            return False, f"FlexAttention runs on CUDA and CPU, not {p.device.type}"
        if p.device.type == "cpu" and p.requires_grad:
            return (
                False,
                "FlexAttention has no backward on CPU (PyTorch raises NotImplementedError); use CUDA",
            )
        if p.head_dim < 16 or p.v_dim < 16:
            return False, f"FlexAttention needs head dims >= 16, got D={p.head_dim}, D_v={p.v_dim}"
        if p.device.type == "cpu" and self.unnormalized:
            return False, (
                "compiled FlexAttention on CPU cannot return the log-sum-exp this method's flex form needs"
            )
        if p.device.type == "cpu" and p.dtype == torch.float16:
            return False, "compiled FlexAttention on CPU does not take float16; use bfloat16 or float32"
        return OK

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        p = call.problem
        factory = call.spec.mask or (causal_mask if p.causal else None)
        block_mask = None
        if factory is not None:
            key = (call.spec.name, call.params.key(), p.causal) if call.spec.mask else ("causal",)
            make = lambda: factory(call.params, MaskContext(p.n_q, p.n_k, p.causal, p.device))
            block_mask, _ = flex_exec.cached_block_mask(key, make, p.n_q, p.n_k, p.device)
        score_mod = self.score_mod(call) if self.score_mod else None
        out, lse = flex_exec.flex_run(
            q,
            k,
            v,
            block_mask=block_mask,
            score_mod=score_mod,
            scale=call.scale,
            return_lse=self.unnormalized,
        )
        if self.unnormalized:
            assert lse is not None
            out = (out.float() * torch.exp(lse.float())[..., None]).to(q.dtype)
        return out


FLEX = FlexBackend()
