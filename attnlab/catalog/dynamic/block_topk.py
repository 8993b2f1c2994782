"""``block_topk``: per query block, the key blocks with the highest pooled-query x pooled-key score.

Estimator (per batch and query head; fp32, whatever the input dtype, so a bf16 call and its fp32
reference choose the same blocks)::

    q_blk[i] = mean of q over query block i (its rows inside the matrix)
    k_blk[j] = mean of k over key block j (the kv head of the query head's GQA group)
    score[i, j] = scale * q_blk[i] . k_blk[j]          (causal: -inf where block j starts after the
                                                        last position of query block i)
    keep the ``topk`` highest blocks of row i, or, with ``mass`` > 0, the fewest highest blocks whose
    softmax share of row i reaches ``mass`` (at most ``topk``); always keep block 0 (``sink``) and the
    query block's diagonal span (``local``): the key blocks holding one of its positions, one block, or
    two when N_k - N_q is not a multiple of ``block`` (causal cross-attention such as chunked prefill
    after a cached prefix: the query block then straddles two key blocks).

Budget: ``topk`` counts the forced blocks as ``sink + local`` (hence ``topk >= sink + local``), the span
as the block of the query block's last position; a second span block comes on top, so such a query block
keeps up to ``topk + 1`` blocks and the scored share (``topk - sink - local``) is the same on every row.

Positions are bottom-right aligned (query ``i`` at ``i + N_k - N_q``). The kept tiles form the plan
(B, H, N_q / block, N_k / block); causal tiles that straddle the diagonal are partial with the causal
rule. Attention is exact softmax attention over the plan's pairs. With ``local`` on (the default) every
causal query with a visible key sees at least its own position (self- and cross-attention), so no such
row is empty; with it off, rows whose kept blocks are all in their future get zeros.

Conventions of other code: this is the block-sparse "pooled score" selection of MoBA / SeerAttention
without a learned gate (their gate replaces the mean pooling) and of FlexPrefill's query-aware branch
(which selects by cumulative mass, ``mass`` here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.errors import ParamError
from attnlab.kernels.block_select.op import select_blocks
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register

#: Tile sizes the block-sparse executor takes.
BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BlockTopkParams(Params):
    """``block``: tile size (query rows = key columns), one of 16, 32, 64, 128, 256 (default 128).
    ``topk``: key blocks kept per query block, sink and local included (>= 1; default 16).
    ``mass``: 0 keeps exactly ``topk`` blocks; in (0, 1] keeps the fewest blocks whose estimated share of
    the row reaches ``mass`` (capped at ``topk``). ``sink`` / ``local``: always keep the first key block /
    the query block's diagonal span (the key blocks holding its positions; the span counts as one block
    of ``topk``, a second span block, when N_k - N_q is not a multiple of ``block``, comes on top)."""

    method = "block_topk"
    block: int = 128
    topk: int = 16
    mass: float = 0.0
    sink: bool = True
    local: bool = True

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"block_topk: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_int("topk", minimum=1)
        self.check_float("mass")
        self.check_bool("sink")
        self.check_bool("local")
        forced = int(self.sink) + int(self.local)
        if self.topk < forced:
            raise ParamError(
                f"block_topk: topk={self.topk} with sink={self.sink} and local={self.local}: topk counts the "
                f"forced blocks (the local span as one), so it must be at least {forced} (else a forced block would "
                "be dropped): raise topk, or set sink=False / local=False"
            )
        if not 0.0 <= float(self.mass) <= 1.0:
            raise ParamError(f"block_topk: mass={self.mass!r} must be in [0, 1] (0 = keep exactly topk)")


def _pool(x: Tensor, block: int) -> Tensor:
    """Mean of x (B, H, N, D) over blocks of ``block`` rows (the last block over its real rows), fp32."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    pad = nb * block - n
    # fp32 accumulation over the input dtype (no fp32 copy of x; padding only for a ragged tail)
    xp = x.detach() if pad == 0 else torch.nn.functional.pad(x.detach(), (0, 0, 0, pad))
    sums = xp.reshape(b, h, nb, block, d).sum(3, dtype=torch.float32)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def estimate(q: Tensor, k: Tensor, params: BlockTopkParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring)."""
    bs = params.block
    h, n_q = q.shape[1], q.shape[2]
    n_k = k.shape[2]
    pq = _pool(q, bs)
    pk = _pool(k, bs).repeat_interleave(h // k.shape[1], dim=1)
    score = (pq @ pk.transpose(-1, -2)) * scale  # (B, H, NQB, NKB)
    full, partial = select_blocks(
        score, n_q=n_q, n_k=n_k, block=bs, topk=params.topk, mass=params.mass, causal=causal,
        sink=params.sink, local=params.local,
    )  # fmt: skip
    if causal:
        offset = n_k - n_q

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= q_idx + offset

        return Plan(n_q, n_k, True, bs, bs, full, partial, mask_mod, kind="dynamic", rule="causal")
    return Plan(n_q, n_k, False, bs, bs, full, partial, None, kind="dynamic")


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: BlockTopkParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention over the pairs of :func:`estimate`'s plan (dense, from its token mask)."""
    mask = estimate(q, k, params, causal=causal, scale=scale).dense_mask()
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    blocks = -(-n // 128)
    return [{"topk": max(2, blocks // 16)}, {"topk": max(2, blocks // 8)}]


SPEC = register(
    MethodSpec(
        name="block_topk",
        family="dynamic",
        paper="MoBA (Lu et al., 2025); SeerAttention (Gao et al., 2024); FlexPrefill (Lai et al., 2025)",
        summary="per query block, the top-k key blocks by pooled q . pooled k (sink and local kept)",
        param_class=BlockTopkParams,
        reference=reference,
        backends=(BLOCK_SPARSE, SdpaMaskBackend()),
        patterns=ALL_PATTERNS,
        estimate=estimate,
        test_params=({"block": 16, "topk": 2}, {"block": 16, "topk": 3, "mass": 0.6, "sink": False}),
        bench_params=_bench,
    )
)
