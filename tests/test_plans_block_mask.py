"""A plan's BlockMask takes its query-side tables (what FlexAttention's backward reads) from the
transposed tile grids instead of ``BlockMask.from_kv_blocks``'s derivation: every table must equal
PyTorch's own, for static plans of every block-rule method, dense causal cross shapes and per-head plans."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import attnlab
from attnlab.plans import Plan, causal_plan, static_plan

FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def _torchs_own(plan: Plan) -> BlockMask:
    return BlockMask.from_kv_blocks(
        *plan.tables(),
        BLOCK_SIZE=(plan.block_q, plan.block_k),
        mask_mod=plan.mask_mod,
        seq_lengths=(plan.n_q, plan.n_k),
    )


def _assert_same(plan: Plan) -> None:
    ours, theirs = plan.block_mask(), _torchs_own(plan)
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    assert ours.mask_mod is theirs.mask_mod
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype == torch.int32 and a.is_contiguous(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("method", "params", "n_q", "n_k", "causal"),
    [
        ("sliding_window", {"window": 300}, 1000, 1000, True),
        ("sliding_window", {"window": 129}, 700, 1300, False),
        ("streaming", {"sinks": 4, "window": 200}, 900, 900, True),
        ("dilated", {"dilation": 3, "window": 250}, 1024, 1024, False),
        ("block_local", {"block": 256, "neighbors": 1}, 1000, 1000, True),
    ],
)
def test_static_plans_block_masks_equal_from_kv_blocks(
    method: str, params: dict[str, Any], n_q: int, n_k: int, causal: bool
) -> None:
    spec = attnlab.get(method)
    plan = static_plan(spec, spec.make_params(params), n_q, n_k, causal, torch.device("cpu"))
    _assert_same(plan)


@pytest.mark.parametrize(("n_q", "n_k"), [(1000, 1000), (300, 1000), (1, 777), (1000, 300)])
def test_causal_plans_block_masks_equal_from_kv_blocks(n_q: int, n_k: int) -> None:
    _assert_same(causal_plan(n_q, n_k, torch.device("cpu")))


def test_per_head_plans_block_masks_equal_from_kv_blocks() -> None:
    g = torch.Generator().manual_seed(3)
    full = torch.rand(2, 3, 7, 9, generator=g) < 0.3
    partial = (torch.rand(2, 3, 7, 9, generator=g) < 0.3) & ~full
    partial[0, 0] = False  # an empty head
    plan = Plan(n_q=7 * 128 - 5, n_k=9 * 128 - 3, causal=False, block_q=128, block_k=128, full=full,
                partial=partial, mask_mod=None, kind="dynamic")  # fmt: skip
    _assert_same(plan)
