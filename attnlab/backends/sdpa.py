"""PyTorch SDPA backends: ``sdpa`` (dense softmax, fastest SDPA kernel first) and ``sdpa_mask``
(softmax with the method's mask materialised as a dense boolean tensor: the plain fallback)."""

from __future__ import annotations

from torch import Tensor

from attnlab.backends.base import OK, Backend, Call, Verdict
from attnlab.kernels.sdpa import sdpa_dense, sdpa_masked
from attnlab.masks import MaskContext, causal_mask, check_dense_size, dense_mask
from attnlab.settings import settings


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch SDPA (cuDNN, flash, mem-efficient or math: the fastest that takes the inputs)"

    def can_use(self, call: Call) -> Verdict:
        if call.spec.mask is not None:
            return False, "sdpa runs dense softmax only; this method has a mask (use sdpa_mask or flex)"
        return OK

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return sdpa_dense(q, k, v, causal=call.problem.causal, scale=call.scale)


class SdpaMaskBackend(Backend):
    name = "sdpa_mask"
    summary = "torch SDPA with the mask as a dense (N_q, N_k) boolean tensor (plain fallback, O(N^2) memory)"

    def can_use(self, call: Call) -> Verdict:
        p = call.problem
        elements = p.n_q * p.n_k + p.dense_elements
        if elements > settings.max_dense_elements:
            return False, (
                f"sdpa_mask would materialise {elements:,} mask/score elements, above "
                f"attnlab.settings.max_dense_elements={settings.max_dense_elements:,}; use flex on CUDA"
            )
        return OK

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        p = call.problem
        check_dense_size(p.dense_elements, "sdpa_mask", "backend='flex' on CUDA")
        factory = call.spec.mask or causal_mask
        mask = dense_mask(
            factory(call.params, MaskContext(p.n_q, p.n_k, p.causal, p.device)), p.n_q, p.n_k, p.device
        )
        return sdpa_masked(q, k, v, mask=mask, scale=call.scale)
