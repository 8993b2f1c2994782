"""The row top-k's searches for the k-th largest score (``op.TOPK_SEARCH`` / ``op.TOPK_THRESHOLDS``: the
multi-way search with 2, 4 or 8 thresholds per round, or the previous 3-way search; each with and without
``TOPK_EARLY_EXIT``) against the naive rule (the k largest, ties at the k-th value to the lowest positions,
-0 == +0, positions ascending), in :func:`row_topk` and in the fused selection that shares its
``_store_topk``.

Also an exact integer model of both searches (``model_search``: the kernels' arithmetic, in Python ints):
its positions are the rule's, and its rounds are the ones the kernel counts (``op.search_rounds``), so
the model's round counts on long rows stand for the kernel's (benchmarks/decode_bench.py records the
kernel's own on the H100).

On CPU in Triton's interpreter (small rows, one long row per case); on CUDA the same tests on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.kernels.decode.naive import row_topk_naive
from attnlab.testing import device_under_test

DEVICE = device_under_test()

KINF = 0x7F800000  # the order key of +inf
KNINF = -0x7F800001  # the order key of -inf

#: (TOPK_SEARCH, TOPK_THRESHOLDS, TOPK_EARLY_EXIT, TOPK_BRACKET_MAX)
SEARCHES = [
    ("multi", 2, True, True),  # the default
    ("multi", 2, True, False),
    ("multi", 4, True, True),
    ("multi", 8, True, False),
    ("multi", 2, False, True),
    ("ternary", 4, True, True),
    ("ternary", 4, False, False),
]
IDS = [
    f"{s}{m if s == 'multi' else ''}-{'early' if e else 'narrow'}{'-bmax' if x and s == 'multi' else ''}"
    for s, m, e, x in SEARCHES
]


@pytest.fixture(params=SEARCHES, ids=IDS)
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, bool, bool]:
    from attnlab.kernels.decode import op

    name, thresholds, early, bmax = request.param
    monkeypatch.setattr(op, "TOPK_SEARCH", name)
    monkeypatch.setattr(op, "TOPK_THRESHOLDS", thresholds)
    monkeypatch.setattr(op, "TOPK_EARLY_EXIT", early)
    monkeypatch.setattr(op, "TOPK_BRACKET_MAX", bmax)
    return request.param


# -- the model ------------------------------------------------------------------------------------------


def order_keys(x: torch.Tensor) -> np.ndarray:
    """int64 array of the kernels' int32 order keys of fp32 values (-0 and +0 one key)."""
    bits = (x.detach().cpu().float() + 0.0).view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).numpy()


def _multi(key: np.ndarray, k: int, m: int, early: bool, bmax: bool) -> tuple[int, int, int]:
    n = len(key)
    n_nan, n_top = int((key > KINF).sum()), int((key >= KINF).sum())
    n_mid, n_bot = int((key > KNINF).sum()), int((key >= KNINF).sum())
    if n_nan >= k:
        lo, c_lo, up, c_up = KINF + 1, n_nan, 2**31, 0
    elif n_top >= k:
        lo, c_lo, up, c_up = KINF, n_top, KINF + 1, n_nan
    elif n_mid >= k:
        lo, c_lo = int(key[key > KNINF].min()), n_mid
        up, c_up = int(key[key < KINF].max()) + 1, n_top
    elif n_bot >= k:
        lo, c_lo, up, c_up = KNINF, n_bot, KNINF + 1, n_mid
    else:
        lo, c_lo, up, c_up = -(2**31), n, KNINF, n_bot
    rounds = 1
    while up - lo > 1 and not (early and c_lo == k) and not (bmax and c_up == k - 1):
        step = (up - lo - 1) // (m + 1) + 1
        ts = [min(lo + i * step, up - 1) for i in range(1, m + 1)]
        cs = [int((key >= t).sum()) for t in ts]
        passed = sum(c >= k for c in cs)  # (the counts fall as the thresholds rise)
        if passed:
            lo, c_lo = ts[passed - 1], cs[passed - 1]
        if passed < m:
            up, c_up = ts[passed], cs[passed]
        rounds += 1
    if bmax and up - lo > 1 and c_up == k - 1 and not (early and c_lo == k):
        lo = int(key[key < up].max())  # the one key of the k left in the bracket: its largest
        rounds += 1
    return lo, k - c_up, rounds


def _ternary(key: np.ndarray, k: int, early: bool) -> tuple[int, int, int]:
    lo, hi, n_lo = int(key.min()), int(key.max()), len(key)
    rounds = 2  # the extremes; the count of the keys above the value found
    while lo < hi and not (early and n_lo == k):
        size = hi - lo + 1
        t1, t2 = lo + size // 3, lo + 2 * size // 3
        c1, c2 = int((key >= t1).sum()), int((key >= t2).sum())
        new_lo = t2 if c2 >= k else t1 if c1 >= k else lo
        n_lo = c2 if c2 >= k else c1 if c1 >= k else n_lo
        hi = t1 - 1 if c1 < k else t2 - 1 if c2 < k else hi
        lo = new_lo
        rounds += 1
    return lo, k - int((key > lo).sum()), rounds


def model_search(
    key: np.ndarray, k: int, name: str, thresholds: int, early: bool, bmax: bool = True
) -> tuple[int, int, int]:
    """(kth, need, rounds) of the kernels' search over one row's order keys: the k are the keys > kth and
    the first ``need`` keys == kth; ``rounds`` as ``op.search_rounds`` counts them."""
    return _multi(key, k, thresholds, early, bmax) if name == "multi" else _ternary(key, k, early)


def model_positions(key: np.ndarray, kth: int, need: int) -> np.ndarray:
    """``_store_topk``'s positions: the keys > kth and the first ``need`` keys == kth, ascending."""
    equal = key == kth
    return np.flatnonzero((key > kth) | (equal & (np.cumsum(equal) <= need)))


# -- rows -----------------------------------------------------------------------------------------------


def _small_rows(n: int) -> torch.Tensor:
    """Rows of n values with what the search must get right: random; all equal; +-0 only; a run of ties
    holding the k-th value; forced +inf and -inf padding; neighbouring floats (keys 1 apart, in pairs of
    ties); every value +inf; every value -inf but one."""
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(8, n, generator=g)
    rows[1] = 0.5
    rows[2] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (n,), generator=g)]
    rows[3, n // 5 : n - n // 5] = 0.25  # k-th values of most k fall in this run
    rows[3, : n // 10] = 3.0
    rows[4, -3:] = float("inf")
    rows[4, : n // 3] = float("-inf")
    rows[4, n // 2 :: 7] = -0.0
    adjacent = 1.0 + torch.randperm(n, generator=g).float() * 2**-23
    rows[5] = adjacent.repeat_interleave(2)[:n] if n > 2 else adjacent
    rows[6] = float("inf")
    rows[7] = float("-inf")
    rows[7, n // 2] = -1.0
    return rows.to(DEVICE)


def quest_rows(rows: int, pages: int, seed: int, forced: int = 1, dim: int = 32) -> torch.Tensor:
    """(rows, pages) Quest page bounds of Gaussian q (4 query rows of a KV group, the max over them) and
    keys (pages of 16), the last ``forced`` pages +inf (the decode step's rows)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 4, 1, dim, generator=g)
    k = torch.randn(rows, 1, pages, 16, dim, generator=g)
    s = torch.maximum(q * k.amax(3), q * k.amin(3)).sum(-1).amax(1)  # (rows, 4, P, dim) -> (rows, P)
    s[:, pages - forced :] = float("inf")
    return s.to(DEVICE)


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 37, 300])
def test_search_picks_the_rule_on_small_rows(n: int, search: tuple) -> None:
    from attnlab.kernels.decode.op import row_topk

    x = _small_rows(n)
    for k in sorted({1, 2, 3, n // 3, n // 2, n - 1, n} & set(range(1, n + 1))):
        assert torch.equal(row_topk(x, k), row_topk_naive(x, k)), k


@pytest.mark.parametrize(("n", "k"), [(16384, 256), (16384, 16384), (8197, 1), (8197, 4099)])
def test_search_picks_the_rule_on_long_rows(n: int, k: int, search: tuple) -> None:
    """The longest row (MAX_TOPK_ROW) and one just past a power of two: Quest-like bounds with a forced
    +inf and -inf padding, and a row whose k-th value sits in a long run of ties."""
    from attnlab.kernels.decode.op import row_topk

    x = quest_rows(2, n, seed=n + k)
    x[0, :1000] = float("-inf")
    x[1, 100 : n - 100] = x[1, n // 2]  # ties across the middle
    assert torch.equal(row_topk(x, k), row_topk_naive(x, k))


def test_model_is_the_rule_and_counts_the_kernels_rounds(search: tuple) -> None:
    """The model's positions are the rule's, and its rounds equal the kernel's on small rows and on Quest
    bounds of 8192 pages (the decode step's row length), keep 256 (the benchmark's budget)."""
    from attnlab.kernels.decode.op import search_rounds

    name, thresholds, early, bmax = search
    cases = [(_small_rows(37), 5), (_small_rows(300), 150), (quest_rows(2, 8192, seed=3), 256)]
    for x, k in cases:
        got = search_rounds(x, k).cpu()
        for i in range(x.shape[0]):
            key = order_keys(x[i])
            kth, need, rounds = model_search(key, k, name, thresholds, early, bmax)
            np.testing.assert_array_equal(model_positions(key, kth, need), row_topk_naive(x[i], k).cpu())
            assert int(got[i]) == rounds, (x.shape, k, i)


def test_default_search_takes_fewer_rounds_on_decode_rows() -> None:
    """On the decode step's rows (Quest bounds, one forced +inf page, keep 256 of 8192; the model) the
    default search takes at most two thirds of the 3-way search's rounds, and none of its rows takes more
    than the 3-way search's fewest; more thresholds per round, fewer rounds."""
    from attnlab.kernels.decode import op

    x = quest_rows(4, 8192, seed=11)
    keys = [order_keys(x[i]) for i in range(4)]

    def rounds(name: str, thresholds: int, bmax: bool = op.TOPK_BRACKET_MAX) -> list[int]:
        return [model_search(key, 256, name, thresholds, True, bmax)[2] for key in keys]

    default, ternary = rounds(op.TOPK_SEARCH, op.TOPK_THRESHOLDS), rounds("ternary", 0)
    assert 3 * sum(default) <= 2 * sum(ternary)
    assert max(default) <= min(ternary)
    assert sum(rounds("multi", 8)) < sum(rounds("multi", 4)) < sum(rounds("multi", 2))
    # the bracket's max (one key of the keep left in it) ends a row's search earlier, never later
    with_max, without = rounds("multi", 2, True), rounds("multi", 2, False)
    assert all(a <= b for a, b in zip(with_max, without, strict=True)) and sum(with_max) < sum(without)


@pytest.mark.parametrize(("name", "thresholds"), [("multi", 8), ("ternary", 4)])
def test_fused_selection_uses_the_search(name: str, thresholds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused selection (one launch; its last program per row runs ``_store_topk``) with another search
    than the default: the rule over its own scores, the counters left zero."""
    from attnlab.kernels.decode import op
    from attnlab.state.pages import summarize

    monkeypatch.setattr(op, "TOPK_SEARCH", name)
    monkeypatch.setattr(op, "TOPK_THRESHOLDS", thresholds)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k = torch.randn(1, 2, 150, 16, device=DEVICE)
    key_mask = torch.ones(1, 150, device=DEVICE)
    key_mask[0, :20] = 0  # left padding: -inf pages
    summary = summarize(k, 4, None, key_mask)
    counter = torch.zeros(2, device=DEVICE, dtype=torch.int32)
    n_pages = 38
    index, scores = op.page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 9, n_pages - 1,
                                          n_pages, True, key_mask)  # fmt: skip
    assert torch.isneginf(scores[..., :5]).all() and torch.isposinf(scores[..., -1]).all()
    assert torch.equal(index, row_topk_naive(scores, 9))
    assert (counter == 0).all()


@pytest.mark.parametrize(("name", "thresholds"), [("multi", 3), ("multi", 16), ("binary", 4)])
def test_unknown_search_is_refused(name: str, thresholds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnlab.kernels.decode import op

    monkeypatch.setattr(op, "TOPK_SEARCH", name)
    monkeypatch.setattr(op, "TOPK_THRESHOLDS", thresholds)
    with pytest.raises(ValueError, match="TOPK_SEARCH"):
        op.row_topk(torch.randn(2, 20, device=DEVICE), 3)
