"""The ``triton`` backend of the score-transform variants (softcap, alibi, bias, sink, selective, softplus,
lowrank_bias): attnlab's Triton kernels (:mod:`attnlab.kernels.score_transform`), forward and backward
(gradients for q, k, v, the sink logits, the ALiBi slopes, the per-query temperature and the low-rank
factors; none for a bias tensor).

The log-sum-exp (``return_lse``, ``lse=True``): the kernel's, the natural log of the normaliser of the
transformed logits (a sink's term included; -inf on a row with no key and no sink), float32; gradients flow
through it (the backward adds ``dlse_i P_ij`` to the logits' gradient). Off for softplus (its kernel's
"lse" is the log of the l1 normaliser, and the method declares no log-sum-exp).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.errors import BackendError
from attnlab.kernels.triton_utils import triton_refusal

_OP_MODULE = "attnlab.kernels.score_transform.op"


class KernelArgs(NamedTuple):
    """What the kernel is given for a call (see :func:`attnlab.kernels.score_transform.op.score_transform_fwd`)."""

    bias: Tensor | None = None
    sinks: Tensor | None = None
    cap: float = 0.0
    slopes: Tensor | None = None
    temp: Tensor | None = None
    #: a low-rank bias's factors (B|1, H|1, N_q, r) and (B|1, H|1, N_k, r): bias = u @ vf^T
    u: Tensor | None = None
    vf: Tensor | None = None
    #: l1-normalised softplus weights instead of the softmax (``temp`` then carries LSSA's length scale)
    softplus: bool = False


#: ``transform(q, call, extra) -> KernelArgs``
Transform = Callable[[Tensor, Call, Mapping[str, Tensor]], KernelArgs]


def _imported_interpreted() -> bool | None:
    mod = sys.modules.get(_OP_MODULE)
    return None if mod is None else bool(mod.IMPORTED_INTERPRETED)


class TritonScoreBackend(Backend):
    name = "triton"
    triton = True
    summary = "attnlab's score-transform Triton kernels (fwd + bwd; CPU only under TRITON_INTERPRET=1)"
    caps = Capabilities(max_head_dim=256, same_v_dim=True, where="GPU; CPU via Triton's interpreter")

    def __init__(self, transform: Transform, *, backward: bool = True, lse: bool = True) -> None:
        self.transform = transform
        if not backward:  # (a bias's gradient: the chooser cannot see whether a tensor input requires grad)
            self.caps = replace(self.caps, backward=False)
        if lse:
            self.caps = replace(self.caps, lse=True)

    def reasons(self, call: Call) -> list[str]:
        why = triton_refusal(call.problem.device, _imported_interpreted())
        return [why] if why else []

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self.launch(q, k, v, call, extra)[0]

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        return self.launch(q, k, v, call, extra)

    def launch(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(output, lse) of the kernel for ``call`` (see the module docstring)."""
        from attnlab.kernels.score_transform.op import score_transform_fwd

        a = self.transform(q, call, extra)
        if a.bias is not None and a.bias.requires_grad and torch.is_grad_enabled():
            raise BackendError(
                "backend 'triton' has no gradient for the bias tensor (it would be N_q x N_k); pass a bias "
                "that does not require grad, or use backend='flex' (CUDA) or 'eager'"
            )
        out, lse = score_transform_fwd(
            q,
            k,
            v,
            a.bias,
            a.sinks,
            a.slopes,
            a.u,
            a.vf,
            a.temp,
            float(call.scale),
            float(a.cap),
            call.problem.causal,
            a.softplus,
        )
        return out, lse
