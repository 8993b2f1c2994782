"""``power``: PowerAttention, key blocks at power-of-two block distances plus a local window and sinks.

Positions are cut into blocks of ``block`` tokens (query ``i`` at position ``p = i + N_k - N_q``, in block
``p // block``; key ``j`` in block ``j // block``). With ``d = |query block - key block|``, a query sees
the key blocks with ``d < window`` (its own block and the ``window - 1`` before it), ``d`` a power of two
(1, 2, 4, 8, ...), and the first ``sinks`` blocks; causal calls also need ``j <= p`` (token level)::

    causal, block=1, window=1, sinks=0 (x = attends): distances 0, 1, 2, 4
    q0: x . . . . . .
    q1: x x . . . . .
    q2: x x x . . . .
    q3: . x x x . . .
    q4: x . x x x . .
    q5: . x . x x x .
    q6: . . x . x x x

A token reaches any earlier one in at most log2(N) hops, with O(log N) key blocks per query block.
The paper (Chen et al. 2025) states the rule at block level; its reported configuration (block 256,
1 sink block, 5 window blocks) is the default here. Non-causal calls use the same distances both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.core import MethodSpec
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class PowerParams(Params):
    """``block``: tokens per block (>= 1, default 256); ``window``: local blocks, own block included
    (>= 1, default 5); ``sinks``: leading key blocks every query sees (>= 0, default 1)."""

    method = "power"
    block: int = 256
    window: int = 5
    sinks: int = 1

    def validate(self) -> None:
        self.check_int("block", minimum=1)
        self.check_int("window", minimum=1)
        self.check_int("sinks", minimum=0)


def mask(p: PowerParams, ctx: MaskContext) -> MaskMod:
    cap = ctx.n_q + ctx.n_k  # no block distance or block index reaches it (keeps int32 consts in range)
    block = ctx.const(min(p.block, cap))
    window = ctx.const(min(p.window, cap))
    sinks = ctx.const(min(p.sinks, cap))

    def power(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + ctx.offset
        kb = kv_idx // block
        d = (pos // block - kb).abs()
        return ctx.causal_ok(pos - kv_idx) & ((d < window) | ((d & (d - 1)) == 0) | (kb < sinks))

    return power


def index_mask(params: PowerParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask as plain index arithmetic, independently of :func:`mask`: per query row,
    the key blocks it sees are marked on a list of the key blocks (the local run ``qb - window + 1 ..
    qb + window - 1``, the distances 1, 2, 4, ... written out on both sides, blocks ``0 .. sinks - 1``)
    and read back per key token; ``pos = i + N_k - N_q``, ``qb = pos // block``, ``j <= pos`` when
    causal."""
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    b = params.block
    n_blocks = -(-n_k // b)  # key blocks 0 .. n_blocks - 1 exist
    block_of_key = torch.arange(n_k) // b
    for i in range(n_q):
        pos = i + n_k - n_q
        qb = pos // b  # below 0 when the row's position is (N_q > N_k)
        seen = torch.zeros(n_blocks, dtype=torch.bool)
        seen[max(qb - params.window + 1, 0) : max(qb + params.window, 0)] = True
        seen[: params.sinks] = True
        step = 1
        while step <= n_blocks + abs(qb):  # no existing key block is farther
            for kb in (qb - step, qb + step):
                if 0 <= kb < n_blocks:
                    seen[kb] = True
            step *= 2
        out[i] = seen[block_of_key]
        if causal:
            out[i, max(pos + 1, 0) :] = False
    return out


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: PowerParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """Softmax attention over the key blocks at block distance ``d < window`` or ``d`` a power of two, and
    the first ``sinks`` key blocks (``d = |p // block - j // block|``, ``p = i + N_k - N_q``; ``j <= p``
    when causal)."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    return [{"block": max(16, min(256, n // 64)), "window": 5, "sinks": 1}]


SPEC = MethodSpec(
    name="power",
    family="static",
    paper="PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse Attention "
    "(Chen et al., 2025)",
    summary="key blocks at power-of-two block distances, a local window of blocks and sink blocks",
    param_class=PowerParams,
    reference=reference,
    backends=MASK_BACKENDS,
    patterns=ALL_PATTERNS,
    mask=mask,
    index_mask=index_mask,
    test_params=({"block": 4, "window": 1, "sinks": 1}, {"block": 16, "window": 2, "sinks": 0}),
    bench_params=_bench,
)
