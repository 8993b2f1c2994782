"""vertical_slash's estimator on planted structure (a column everyone reads, a diagonal at a fixed
distance), its tile-band convention and its bad input; executor parity runs in test_parity."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.vertical_slash import VerticalSlashParams, estimate
from attnlab.errors import ParamError

N, COLUMN, DISTANCE = 96, 7, 20


def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 1, N, 64): keys are random near-orthogonal directions; query i is the sum of key COLUMN's
    direction and key (i - DISTANCE)'s, so each row splits its mass between the two."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(N, 64, generator=g), dim=-1)
    k = unit * 5.5
    q = unit[COLUMN].expand(N, 64).clone()
    q[DISTANCE:] += unit[: N - DISTANCE]
    return (q * 5.5)[None, None], k[None, None]


def test_the_estimator_finds_the_planted_column_and_distance() -> None:
    q, k = planted()
    # slash = 2: the diagonal (distance 0, always kept, local_diagonals = 0 or not) and the planted one
    p = VerticalSlashParams(vertical=1, slash=2, last_q=16, block=16, sink_columns=0, local_diagonals=0)
    plan = estimate(q, k, p, causal=True, scale=1.0)
    assert plan.columns is not None and set(plan.columns[0, 0, 0].tolist()) == {COLUMN}
    # the kept distance's band: in query block i, the tiles holding keys (positions - DISTANCE), and the
    # diagonal's (tile i)
    tiles = (plan.full | plan.partial)[0, 0]
    for i in range(N // 16):
        want = {max(0, (i * 16 - DISTANCE)) // 16, max(0, (i * 16 + 15 - DISTANCE)) // 16}
        if i * 16 + 15 - DISTANCE < 0:
            want = set()
        assert set(tiles[i].nonzero()[:, 0].tolist()) == want | {i}, i


def test_sinks_and_local_diagonals_are_always_kept() -> None:
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    p = VerticalSlashParams(vertical=3, slash=1, last_q=8, block=16, sink_columns=3, local_diagonals=1)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    assert plan.columns is not None and plan.columns[0, :, 0].tolist() == [[0, 1, 2], [0, 1, 2]]
    diag = torch.eye(4, dtype=torch.bool)
    assert torch.equal(plan.partial[0, 0], diag) and not plan.full.any()  # distance 0: the diagonal tiles


def test_batch_and_gqa_estimate_each_sequence_alone() -> None:
    q, k = torch.randn(3, 4, 64, 16), torch.randn(3, 2, 64, 16)
    p = VerticalSlashParams(vertical=4, slash=3, last_q=8, block=16, sink_columns=1, local_diagonals=1)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    alone = estimate(q[2:], k[2:], p, causal=True, scale=0.25)
    assert plan.columns is not None and alone.columns is not None
    assert torch.equal(plan.columns[2], alone.columns[0]) and torch.equal(plan.full[2], alone.full[0])
    assert torch.equal(plan.partial[2], alone.partial[0])
    # GQA: query head h estimates with kv head h // 2, as with k repeated per query head (MHA)
    mha = estimate(q, k.repeat_interleave(2, dim=1), p, causal=True, scale=0.25)
    assert mha.columns is not None
    assert torch.equal(plan.columns, mha.columns)
    assert torch.equal(plan.full, mha.full) and torch.equal(plan.partial, mha.partial)


def test_full_budget_equals_dense_causal_attention() -> None:
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    out = attnlab.attention(q, k, v, method="vertical_slash", causal=True, vertical=50, slash=100, block=16,
                            backend="reference")  # fmt: skip
    dense = attnlab.attention(q, k, v, method="softmax", causal=True, backend="reference")
    torch.testing.assert_close(out, dense)


def test_bad_input_gets_clear_errors() -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match="tiles of"):
        attnlab.attention(q, q, q, method="vertical_slash", causal=True, block=24)
    with pytest.raises(ParamError, match="vertical"):
        attnlab.attention(q, q, q, method="vertical_slash", causal=True, vertical=0)
    with pytest.raises(Exception, match="causal"):
        attnlab.attention(q, q, q, method="vertical_slash", causal=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vertical": 2, "sink_columns": 3}, "vertical=2 is below sink_columns=3"),
        ({"slash": 1, "local_diagonals": 2}, "slash=1 is below local_diagonals=2"),
    ],
)
def test_budgets_below_their_forced_entries_are_refused(kwargs: dict, match: str) -> None:
    # else topk picks an arbitrary subset of the tied +inf sinks / local diagonals
    with pytest.raises(ParamError, match=match):
        VerticalSlashParams(**{"vertical": 3, "slash": 3, "sink_columns": 1, "local_diagonals": 1, **kwargs})
    VerticalSlashParams(vertical=3, slash=2, sink_columns=3, local_diagonals=2)  # equal: every one kept
