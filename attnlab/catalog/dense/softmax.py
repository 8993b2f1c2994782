"""``softmax``: standard scaled dot-product attention, the baseline (exactly PyTorch SDPA)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.flex import FLEX
from attnlab.backends.sdpa import SdpaBackend
from attnlab.core import MethodSpec
from attnlab.masks import causal_mask, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.reference import masked_softmax_attention
from attnlab.registry import register


@dataclass(frozen=True)
class SoftmaxParams(Params):
    """No parameters."""

    method = "softmax"


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: SoftmaxParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """``O = softmax(scale * Q K^T + M) V``; ``M_ij = -inf`` where ``j > i + N_k - N_q`` when causal.

    Causal with N_q > N_k leaves the first N_q - N_k rows without keys: those rows are 0.
    """
    mask = mask_for(causal_mask, params, q.shape[2], k.shape[2], causal, q.device) if causal else None
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


SPEC = register(
    MethodSpec(
        name="softmax",
        family="dense",
        paper="Attention Is All You Need (Vaswani et al., 2017)",
        summary="dense softmax attention; dispatches to the fastest SDPA kernel",
        param_class=SoftmaxParams,
        reference=reference,
        # BLOCK_SPARSE last: never chosen before sdpa/flex for ordinary calls; packed (cu_seqlens) calls on
        # a GPU get its one-launch varlen path instead of one call per sequence
        backends=(SdpaBackend(), FLEX, BLOCK_SPARSE),
        patterns=ALL_PATTERNS,
        test_params=({},),
        bench_params=lambda n: [{}],
    )
)
