"""``strided_heads``: S2-Attention's context sharding, each head its own strided key blocks plus a local window.

Positions are cut into blocks of ``block`` tokens (query ``i`` at ``p = i + N_k - N_q`` in block
``qb = p // block``, key ``j`` in block ``kb = j // block``). Key/value head ``g`` (shared by its
``H / H_kv`` query heads, so that the KV cache stays per KV head) owns the key blocks of one residue:
``(kb + o_g) % vert_stride == 0`` with ``o_g = g * max(1, vert_stride // H_kv)``. Every query also sees the
``local`` nearest key blocks (``0 <= qb - kb < local``; ``|qb - kb| < local`` when not causal); causal
calls need ``j <= p``::

    causal, block=1, local=2, vert_stride=3, H_kv=3 (x = attends; head g keeps kb = -g mod 3)
    head 0             head 1             head 2
    q0: x . . . . .    x . . . . .        x . . . . .
    q1: x x . . . .    x x . . . .        x x . . . .
    q2: x x x . . .    . x x . . .        . x x . . .
    q3: x . x x . .    . . x x . .        . x x x . .
    q4: x . . x x .    . . x x x .        . x . x x .
    q5: x . . x x x    . . x . x x        . x . . x x

With ``H_kv >= vert_stride`` the residues of the heads cover every key block: the union of the heads'
shards is the whole context (tested). The pattern depends on the head, which attnlab's static plans
(one mask for every head) do not express, so this method runs on its own backends, each given the
per-head plan (:func:`head_plan`): FlexAttention with a per-head BlockMask, attnlab's block-sparse executor
with per-head tables, and SDPA with a per-head dense mask.

Sharding follows the paper's dkernel code (linxihui/dkernel ``utils.get_sparse_attn_mask``: absolute
vertical positions ``(kb + h * head_sliding_step + head_sliding_offset) % vert_stride == 0`` per KV head,
local blocks ``(local, 1)`` when causal and ``(local, local)`` both ways otherwise, queries bottom-right
at ``past_len + i``), with two choices of ours: the step is ``max(1, vert_stride // H_kv)`` (dkernel divides
by the query heads H, so with GQA its KV heads take neighbouring residues and may leave some uncovered),
and non-causal calls keep the absolute, per-head shards (dkernel's bidirectional default,
``vert_position_type='relative'``, strides relative to the local window and is the same for every head).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities, dense_size_reasons
from attnlab.backends.block_sparse import CPU_TILE, TILE, BlockSparseBackend
from attnlab.backends.flex import FlexBackend
from attnlab.core import MethodSpec
from attnlab.kernels.sdpa import sdpa_masked
from attnlab.masks import MaskContext, MaskMod, check_dense_size
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans import Plan, plan_from_mask
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class StridedHeadsParams(Params):
    """``block``: tokens per block (>= 1, default 64); ``local``: local key blocks, own block included
    (>= 1, default 16); ``vert_stride``: one key block in ``vert_stride`` per head (1 to 2**20, default 8)."""

    method = "strided_heads"
    block: int = 64
    local: int = 16
    vert_stride: int = 8

    def validate(self) -> None:
        self.check_int("block", minimum=1)
        self.check_int("local", minimum=1)
        self.check_int("vert_stride", minimum=1, maximum=2**20)


def head_offset(params: StridedHeadsParams, kv_head: int, kv_heads: int) -> int:
    """``o_g``: the residue shift of KV head ``g``'s strided blocks."""
    return (kv_head * max(1, params.vert_stride // kv_heads)) % params.vert_stride


def mask(p: StridedHeadsParams, ctx: MaskContext, heads: int, kv_heads: int) -> MaskMod:
    """The head-dependent mask_mod (``h``: the query head) for a call with these head counts."""
    cap = ctx.n_q + ctx.n_k  # no block index or distance reaches it (keeps int32 consts in range)
    block, local = ctx.const(min(p.block, cap)), ctx.const(min(p.local, cap))
    stride, group = ctx.const(p.vert_stride), ctx.const(heads // kv_heads)
    step = ctx.const(max(1, p.vert_stride // kv_heads))  # (kb + g * step) % stride == 0 <=> o_g's rule

    def strided_heads(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + ctx.offset
        kb = kv_idx // block
        d = pos // block - kb
        near = (d < local) & ((d >= 0) | ctx.not_causal) & (d > -local)
        shard = (kb + (h // group) * step) % stride == 0
        return ctx.causal_ok(pos - kv_idx) & (near | shard)

    return strided_heads


def index_mask(params: StridedHeadsParams, n_q: int, n_k: int, causal: bool, kv_heads: int) -> Tensor:
    """The (H_kv, N_q, N_k) bool mask per KV head as plain index arithmetic, independently of :func:`mask`
    (query head ``h`` uses row ``h // (H / H_kv)``): per query row the slice of its local key blocks
    (the same for every head), then per head the columns of the key blocks it owns, listed;
    ``j <= pos`` when causal."""
    b, off = params.block, n_k - n_q
    n_blocks = -(-n_k // b)
    local = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        qb = (i + off) // b
        first = max(qb - params.local + 1, 0)
        last = qb if causal else min(qb + params.local - 1, n_blocks)  # key blocks, inclusive
        if last >= first:
            local[i, first * b : (last + 1) * b] = True
    block_of_key = torch.arange(n_k) // b
    out = torch.zeros(kv_heads, n_q, n_k, dtype=torch.bool)
    for g in range(kv_heads):
        offset = head_offset(params, g, kv_heads)
        owned = torch.tensor([(kb + offset) % params.vert_stride == 0 for kb in range(n_blocks)])
        out[g] = local | owned[block_of_key][None, :]
    if causal:
        out &= torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=off)
    return out


def head_mask(params: StridedHeadsParams, n_q: int, n_k: int, causal: bool, heads: int, kv_heads: int,
              device: Any) -> Tensor:  # fmt: skip
    """The dense (H, N_q, N_k) mask of :func:`mask` (size-checked), one slice per query head."""
    check_dense_size(heads * n_q * n_k, "a per-head dense mask", "a fast backend (backend=None)")
    mm = mask(params, MaskContext(n_q, n_k, causal, device), heads, kv_heads)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    h = torch.arange(heads, dtype=torch.int32, device=device)[:, None, None]
    q_idx = torch.arange(n_q, dtype=torch.int32, device=device)[None, :, None]
    kv_idx = torch.arange(n_k, dtype=torch.int32, device=device)[None, None, :]
    return mm(zero, h, q_idx, kv_idx).expand(heads, n_q, n_k)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: StridedHeadsParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention where query head ``h`` (KV head ``g = h // (H / H_kv)``) sees key ``j`` when its
    block ``kb = j // block`` is local (``0 <= qb - kb < local``, or ``|qb - kb| < local`` when not causal)
    or owned by the head (``(kb + o_g) % vert_stride == 0``); ``qb = (i + N_k - N_q) // block``, ``j <= p``
    when causal."""
    m = head_mask(params, q.shape[2], k.shape[2], causal, q.shape[1], k.shape[1], q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m[None], upcast=upcast)


def head_plan(call: Call, block: int = 128) -> Plan:
    """The per-head plan of a call (Hp = H): one plan per KV head from :func:`mask`, stacked."""
    p = call.problem
    params = call.params
    assert isinstance(params, StridedHeadsParams)
    ctx = MaskContext(p.n_q, p.n_k, p.causal, p.device)
    mm = mask(params, ctx, p.heads, p.kv_heads)
    per_kv = []
    by_offset: dict[int, Plan] = {}  # KV heads of one residue shift share their plan
    for g in range(p.kv_heads):
        offset = head_offset(params, g, p.kv_heads)
        if offset not in by_offset:
            h = torch.tensor(g * p.group, dtype=torch.int32, device=p.device)

            def fixed(b: Tensor, _h: Tensor, q_idx: Tensor, kv_idx: Tensor, h: Tensor = h) -> Tensor:
                return mm(b, h, q_idx, kv_idx)

            by_offset[offset] = plan_from_mask(fixed, p.n_q, p.n_k, p.causal, p.device, block, block)
        per_kv.append(by_offset[offset])
    rows = [per_kv[h // p.group] for h in range(p.heads)]
    return Plan(
        n_q=p.n_q,
        n_k=p.n_k,
        causal=p.causal,
        block_q=block,
        block_k=block,
        full=torch.cat([r.full for r in rows], dim=1),
        partial=torch.cat([r.partial for r in rows], dim=1),
        mask_mod=mm,
        kind="static",
        allowed_count=torch.cat([r.allowed_count for r in rows if r.allowed_count is not None], dim=1),
    )


def _memo_plan(call: Call, block: int = 128) -> Plan:
    key = "head_plan" if block == 128 else f"head_plan_{block}"
    plan = call.memo.get(key)
    if plan is None:
        plan = head_plan(call, block)
        if not torch.compiler.is_compiling():
            call.memo[key] = plan
    assert isinstance(plan, Plan)
    return plan


class HeadFlexBackend(FlexBackend):
    """FlexAttention with the call's per-head plan as its BlockMask."""

    def __init__(self) -> None:
        super().__init__()
        # no lse from this backend: not checked against the reference's per-head log-sum-exp (which the
        # reference takes from the per-head plan, attnlab.backends.eager._backends_plan)
        self.caps = replace(self.caps, lse=False, plan_kinds=frozenset())

    def _plan(self, call: Call) -> Plan | None:
        return _memo_plan(call)

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        return _memo_plan(call)


class HeadBlockSparseBackend(BlockSparseBackend):
    """attnlab's block-sparse executor over the call's per-head plan (Hp = H: each query head its own
    tables; 128 x 128 tiles on a GPU, 32 x 32 on a CPU in the interpreter), forward and backward. The
    tables are built once per call signature (``call.memo``)."""

    summary = (
        "attnlab's block-sparse Triton executor over the per-head plan (fwd + bwd; CPU only interpreted)"
    )
    # no lse: not checked against the reference's per-head log-sum-exp (taken from the per-head plan,
    # attnlab.backends.eager._backends_plan); no plan kind: the method has no (head-independent) mask for
    # the generic plan path
    caps = replace(BlockSparseBackend.caps, lse=False, plan_kinds=frozenset())

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Plan:
        return _memo_plan(call, CPU_TILE if call.problem.device.type == "cpu" else TILE)


class HeadMaskSdpaBackend(Backend):
    name = "sdpa_mask"
    summary = "torch SDPA with a per-head dense (H, N_q, N_k) boolean mask (plain fallback, O(N^2) memory)"
    caps = Capabilities()

    def reasons(self, call: Call) -> list[str]:
        p = call.problem
        return dense_size_reasons(self.name, call, p.heads * p.n_q * p.n_k + p.dense_elements)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        m = call.memo.get("head_mask")
        if m is None:
            m = _memo_plan(call).dense_mask()[0]
            call.memo["head_mask"] = m
        return sdpa_masked(q, k, v, mask=m, scale=call.scale)

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        return _memo_plan(call)


def _bench(n: int) -> list[dict[str, int]]:
    block = max(16, min(64, n // 64))
    return [{"block": block, "local": max(1, n // block // 16), "vert_stride": 8}]


SPEC = MethodSpec(
    name="strided_heads",
    family="static",
    paper="S2-Attention: Efficient LLM Training and Serving with Heterogeneous Context Sharding among "
    "Attention Heads (Lin et al., 2024; code: github.com/linxihui/dkernel)",
    summary="per-KV-head strided key blocks (shards whose union is the context) plus local blocks",
    param_class=StridedHeadsParams,
    reference=reference,
    # the executor first: H100, bf16, 8K causal, H=32, D=128, defaults: forward 0.73 ms vs Flex 1.13, forward +
    # backward 3.61 vs 4.05 (benchmarks/results/h100-2026-11-23-s2/variants/, 56ab39e; 32K not measured)
    backends=(HeadBlockSparseBackend(), HeadFlexBackend(), HeadMaskSdpaBackend()),
    patterns=ALL_PATTERNS,
    test_params=({"block": 4, "local": 2, "vert_stride": 4}, {"block": 16, "local": 1, "vert_stride": 3}),
    bench_params=_bench,
)
