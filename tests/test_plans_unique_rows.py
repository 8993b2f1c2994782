"""``plans.executor.unique_rows``: the distinct tile masks of a plan without ``torch.unique(dim=0)`` (slow on
a GPU), exact whatever the hash does."""

from __future__ import annotations

import pytest
import torch

from attnlab.plans import executor
from attnlab.plans.executor import unique_rows


def _rows(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(t, n, generator=g) < 0.5
    m[t // 2 :] = m[: t - t // 2].clone()  # every row of the second half repeats one of the first
    return m


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two inverse-index vectors group the rows alike (the distinct rows may be numbered differently)."""
    pairs = torch.unique(torch.stack([a, b]), dim=1).shape[1]
    return pairs == int(a.max()) + 1 == int(b.max()) + 1


@pytest.mark.parametrize("t, n", [(1, 5), (7, 64), (40, 16384), (50, 100), (3, 1)])
@pytest.mark.parametrize("hashed", [True, False])
def test_unique_rows_is_torch_unique_up_to_order(t: int, n: int, hashed: bool) -> None:
    m = _rows(t, n, seed=t * n)
    uniq, inverse = unique_rows(m, hashed=hashed)
    want, want_inverse = torch.unique(m.to(torch.uint8), dim=0, return_inverse=True)
    assert uniq.dtype == torch.uint8 and uniq.shape == want.shape
    assert torch.equal(uniq[inverse].bool(), m)  # each row maps to its own mask
    assert _same_partition(inverse, want_inverse)


@pytest.mark.parametrize("hashed", [True, False])
def test_unique_rows_of_nothing(hashed: bool) -> None:
    for shape in ((0, 16), (0, 0)):
        uniq, inverse = unique_rows(torch.zeros(shape, dtype=torch.bool), hashed=hashed)
        assert inverse.numel() == 0 and uniq.shape == (0, shape[1]) and uniq.dtype == torch.uint8
    uniq, inverse = unique_rows(torch.zeros(3, 0, dtype=torch.bool), hashed=hashed)
    assert uniq.shape == (1, 0) and inverse.tolist() == [0, 0, 0]


def test_unique_rows_is_exact_when_every_hash_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multipliers of zero give every row the same hash: the check sees it and falls back."""
    monkeypatch.setattr(
        executor, "_row_hash_multipliers", lambda w, d: torch.zeros(w, dtype=torch.int64, device=d)
    )
    m = _rows(30, 200, seed=1)
    uniq, inverse = unique_rows(m, hashed=True)
    want, want_inverse = torch.unique(m.to(torch.uint8), dim=0, return_inverse=True)
    assert torch.equal(uniq[inverse].bool(), m) and uniq.shape == want.shape
    assert _same_partition(inverse, want_inverse)


def test_executor_tables_take_the_same_tile_masks_through_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-head strided_heads plan (no block rule, so its tile masks go through ``distinct_words``): the
    executor's tables are the same on the hashed route (what a GPU takes) as on the CPU's
    ``unique(dim=0)``, pattern ids included (both number the distinct masks by first occurrence)."""
    import attnlab
    from attnlab.api import _resolve_call
    from attnlab.catalog.structured.strided_heads import head_plan

    spec = attnlab.methods()["strided_heads"]
    params = spec.param_class(block=8, local=2, vert_stride=3)
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    plan = head_plan(_resolve_call(spec, params, q, k, k, causal=True, scale=None, want_lse=False), 32)
    tables = [executor.executor_tables(plan)]
    real, hashed_calls = executor.distinct_words, [0]

    def hashed(w: torch.Tensor, hashed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hashed_calls[0] += 1
        return real(w, hashed=True)

    monkeypatch.setattr(executor, "distinct_words", hashed)
    tables.append(executor.executor_tables(head_plan(
        _resolve_call(spec, params, q, k, k, causal=True, scale=None, want_lse=False), 32)))  # fmt: skip
    a, b = tables
    assert hashed_calls[0] >= 1  # the second tables went through the hashed route
    assert int(a.p_num.sum()) > 0
    for x, y in zip(a.as_args(), b.as_args(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the hashed route is a GPU's default)"
)
def test_executor_tables_on_cuda_match_the_cpu() -> None:
    import attnlab
    from attnlab.api import _resolve_call
    from attnlab.catalog.structured.strided_heads import head_plan

    spec = attnlab.methods()["strided_heads"]
    params = spec.param_class()
    tables = []
    for dev in ("cpu", "cuda"):
        q, k = torch.randn(1, 5, 4100, 64, device=dev), torch.randn(1, 1, 4100, 64, device=dev)
        call = _resolve_call(spec, params, q, k, k, causal=True, scale=None, want_lse=False)
        tables.append(executor.executor_tables(head_plan(call, 128)))
    a, b = tables
    assert torch.equal(a.p_num, b.p_num.cpu()) and torch.equal(a.p_idx, b.p_idx.cpu())
    assert torch.equal(a.tp_num, b.tp_num.cpu()) and torch.equal(a.tp_idx, b.tp_idx.cpu())
    for num, pa, pb in ((a.p_num, a.p_pat, b.p_pat.cpu()), (a.tp_num, a.tp_pat, b.tp_pat.cpu())):
        listed = torch.arange(pa.shape[-1]) < num[..., None]
        assert torch.equal(a.patterns[pa[listed].long()], b.patterns.cpu()[pb[listed].long()])
