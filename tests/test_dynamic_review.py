"""The forced local span of the dynamic estimators in causal cross-attention (chunked prefill after a
cached prefix): when N_k - N_q is not a multiple of the block, a query block straddles two key blocks and
both are forced, so every query row keeps its own position (block_topk, seer, flexprefill, nsa, dhsa; hip
was right already). Where the offset is a multiple of the block the plans are the ones before the span
(digests of the previous rule's plans on fixed seeds)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch

import attnlab.catalog.dynamic  # noqa: F401  (registers the dynamic methods)
from attnlab.catalog.dynamic import nsa
from attnlab.catalog.dynamic._tiles import geometry
from attnlab.registry import get

#: (method, params) with budgets small enough that the old rule left rows without their own position
SMALL = [
    ("block_topk", {"block": 16, "topk": 2}),
    ("block_topk", {"block": 16, "topk": 1, "sink": False}),
    ("block_topk", {"block": 16, "topk": 3, "mass": 0.6}),
    ("seer", {"block": 16, "topk": 1}),
    ("seer", {"block": 16, "threshold": 0.5}),
    ("flexprefill", {"block": 16, "gamma": 0.05, "tau": 0.0, "min_budget": 16, "max_budget": 16}),
    ("flexprefill", {"block": 16, "gamma": 0.3, "tau": 1.0, "min_budget": 16}),
    ("nsa", {"block": 16, "topn": 1, "window": 0}),
    ("nsa", {"block": 16, "topn": 3, "window": 0, "local": 2, "sink": True}),
    ("dhsa", {"block": 16, "budget": 16, "local": 1, "sink": 0, "dense_last": 0}),
    ("dhsa", {"block": 16, "budget": 32, "local": 5, "sink": 16, "dense_last": 0}),
    ("hip", {"block": 16, "mask_k": 16, "window": 1, "sink": 0}),
]


def _plan_mask(
    name: str, params: dict[str, Any], q: torch.Tensor, k: torch.Tensor, causal: bool
) -> torch.Tensor:
    spec = get(name)
    p = spec.make_params(params)
    if name == "nsa":
        return nsa.estimate_selection(q, k, p, causal=causal, scale=0.25).dense_mask()
    return spec.estimate(q, k, p, causal=causal, scale=0.25).dense_mask()  # type: ignore[misc]


@pytest.mark.parametrize(("n_q", "n_k"), [(64, 88), (40, 100), (100, 40), (50, 77)])
@pytest.mark.parametrize(("name", "params"), SMALL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SMALL)])
def test_chunked_prefill_rows_keep_their_own_position(
    name: str, params: dict[str, Any], n_q: int, n_k: int
) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, n_q, 16, generator=g),
        torch.randn(2, 2, n_k, 16, generator=g),
        torch.randn(2, 2, n_k, 16, generator=g),
    )
    assert (n_k - n_q) % 16 != 0
    mask = _plan_mask(name, params, q, k, True).expand(2, 4, n_q, n_k)
    pos = torch.arange(n_q) + n_k - n_q
    rows = pos >= 0  # rows with a visible key
    own = mask[:, :, rows, pos[rows]]
    assert bool(own.all()), f"{int((~own).sum())} rows miss their own position"
    assert not bool((mask & (torch.arange(n_k) > pos[:, None])).any())  # causal
    spec = get(name)
    out = spec.reference(q, k, v, spec.make_params(params), causal=True, scale=0.25)
    assert not bool((out[:, :, rows].abs().sum(-1) == 0).any())  # no row with visible keys gets zeros


def test_the_local_span_is_the_key_blocks_of_the_query_blocks_positions() -> None:
    geo = geometry(64, 88, 16, torch.device("cpu"))  # positions 24 .. 87: query block i at 24 + 16 i ..
    span = geo.local_span()
    assert [row.nonzero().flatten().tolist() for row in span] == [[1, 2], [2, 3], [3, 4], [4, 5]]
    aligned = geometry(64, 96, 16, torch.device("cpu"))
    assert torch.equal(aligned.local_span().sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(aligned.local_span().nonzero()[:, 1], aligned.local())
    rows_without_keys = geometry(100, 40, 16, torch.device("cpu"))  # block 0 at -60 .. -45: clamped
    assert rows_without_keys.local_span()[0].nonzero().flatten().tolist() == [0]


def _digest(name: str, params: dict[str, Any], causal_only: bool) -> str:
    h = hashlib.sha256()
    for seed in range(3):
        for n_q, n_k in [(64, 64), (40, 40), (80, 80), (48, 96), (20, 116)]:  # offsets multiples of 16
            for causal in (True,) if causal_only else (True, False):
                g = torch.Generator().manual_seed(seed)
                q = torch.randn(2, 4, n_q, 16, generator=g)
                k = torch.randn(2, 2, n_k, 16, generator=g)
                mask = _plan_mask(name, params, q, k, causal).expand(2, 4, n_q, n_k).contiguous()
                h.update(mask.numpy().tobytes())
    return h.hexdigest()[:16]


#: digests of the plans of the rule before the local span (the block of the query block's last position)
ALIGNED = [
    ("block_topk", {"block": 16, "topk": 2}, "0c8c9f46d183066c"),
    ("block_topk", {"block": 16, "topk": 3, "mass": 0.6, "sink": False}, "94b0c6374811bbe1"),
    ("block_topk", {"block": 16, "topk": 1, "sink": False}, "28e62cc5d5d3bb83"),
    ("seer", {"block": 16, "topk": 1}, "28e62cc5d5d3bb83"),
    ("seer", {"block": 16, "topk": 3}, "e4351d8c0902d21a"),
    ("seer", {"block": 16, "threshold": 0.3}, "e0b04cc5c27f7736"),
    ("flexprefill", {"block": 16, "gamma": 0.3, "tau": 0.1, "min_budget": 16}, "f4e4df4867e3e5ec"),
    (
        "flexprefill",
        {"block": 16, "gamma": 0.6, "tau": 0.0, "min_budget": 16, "max_budget": 32},
        "436796e8d7dd7e64",
    ),
    ("nsa", {"block": 16, "topn": 2, "window": 8}, "7012d4e3fe0b5503"),
    ("nsa", {"block": 16, "topn": 4, "window": 0, "local": 2, "sink": True}, "394d9db47a329d2d"),
    ("nsa", {"block": 16, "topn": 4, "local": 2, "sink": True, "granularity": "token"}, "47579fe73c5a0037"),
    (
        "dhsa",
        {"block": 16, "budget": 32, "chunk_beta": 2, "local": 16, "sink": 16, "dense_last": 8},
        "dbbe3f6ae3b9a854",
    ),
    (
        "dhsa",
        {"block": 16, "budget": 48, "chunk_beta": 1, "local": 1, "sink": 0, "dense_last": 0},
        "2345707f8714e5f6",
    ),
    ("dhsa", {"block": 16, "budget": 32, "local": 5, "sink": 0, "dense_last": 0}, "62ac3316ccff41fe"),
]


@pytest.mark.parametrize(
    ("name", "params", "digest"), ALIGNED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ALIGNED)]
)
def test_plans_are_unchanged_where_the_offset_is_a_multiple_of_the_block(
    name: str, params: dict[str, Any], digest: str
) -> None:
    assert _digest(name, params, name in ("flexprefill", "nsa", "dhsa")) == digest
