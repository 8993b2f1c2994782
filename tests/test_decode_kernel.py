"""The decode kernels (split-K attention over selected entries, Quest page scores) against their naive twins.

On CPU these run in Triton's interpreter on tiny shapes; on CUDA the same tests run on the GPU, plus a
CUDA-graph capture. The naive twin itself is checked against masked dense attention built independently.
"""

from __future__ import annotations

import pytest
import torch

from attnlab.kernels.decode.naive import (
    decode_attention_naive,
    page_scores_naive,
    row_topk_naive,
    selected_mask,
)
from attnlab.testing import device_under_test

DEVICE = device_under_test()


def _index(b: int, h_kv: int, n_entries: int, n: int, *, holes: bool = True) -> torch.Tensor:
    """(b, h_kv, n) distinct random entries of range(n_entries), with a few -1 holes."""
    rows = [torch.randperm(n_entries)[:n] for _ in range(b * h_kv)]
    idx = torch.stack(rows).view(b, h_kv, n).to(torch.int32)
    if holes and n > 1:
        idx[0, 0, 1] = -1
    return idx.to(DEVICE)


def _qkv(b, h, h_kv, n_q, n_k, d, dtype):  # type: ignore[no-untyped-def]
    q = torch.randn(b, h, n_q, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype)
    return q, k, v


def test_naive_twin_equals_masked_dense_attention() -> None:
    q, k, v = _qkv(1, 4, 2, 3, 21, 8, torch.float64)
    idx = torch.tensor([[[0, 3, 5], [1, -1, 4]]], device=DEVICE)  # page 4: tokens 0-3, 12-15, 20 / 4-7, 16-19
    out, lse = decode_attention_naive(q, k, v, idx, 4, 0.5, True)
    allowed = torch.zeros(2, 21, dtype=torch.bool)
    allowed[0, [0, 1, 2, 3, 12, 13, 14, 15, 20]] = True
    allowed[1, [4, 5, 6, 7, 16, 17, 18, 19]] = True
    for h in range(4):
        for i in range(3):
            cols = [j for j in range(21) if allowed[h // 2, j] and j <= i + 18]
            s = (q[0, h, i] @ k[0, h // 2, cols].T) * 0.5
            torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0).float(), atol=1e-6, rtol=1e-5)
            want = torch.softmax(s, 0) @ v[0, h // 2, cols]  # naive: fp32 math
            torch.testing.assert_close(out[0, h, i], want, atol=1e-6, rtol=1e-5)


CASES = [
    # b, h, h_kv, n_q, n_k, d, page, entries, dtype
    (2, 4, 2, 1, 70, 16, 4, 9, torch.float32),  # GQA 2:1, page 4, several splits
    (1, 6, 2, 3, 40, 24, 1, 17, torch.float32),  # token lists, odd head dim, 3 queries
    (2, 2, 2, 2, 45, 16, 16, 2, torch.bfloat16),  # MHA, page 16 with a partial last page
    (1, 16, 2, 9, 50, 16, 2, 6, torch.float32),  # 72 rows per group: two row blocks
]


#: every case with and without per-row counts, but the slowest (two row blocks) with counts only
RUNS = [(c, w) for c in CASES for w in (False, True) if w or c is not CASES[3]]


@pytest.mark.parametrize(
    ("case", "with_count"), RUNS, ids=[f"case{CASES.index(c)}-count{w}" for c, w in RUNS]
)
def test_kernel_matches_naive(case: tuple, with_count: bool, poison_empty: None) -> None:
    from attnlab.kernels.decode.op import decode_attention

    b, h, h_kv, n_q, n_k, d, page, n, dtype = case
    q, k, v = _qkv(b, h, h_kv, n_q, n_k, d, dtype)
    idx = _index(b, h_kv, -(-n_k // page), n)
    count = torch.randint(0, n + 1, (b, h_kv), device=DEVICE, dtype=torch.int32) if with_count else None
    out, lse = decode_attention(q, k, v, idx, count, page, 0.3, True)
    want, want_lse = decode_attention_naive(q, k, v, idx, page, 0.3, True, count)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (eps 2^-8, |out| < 3)
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-4, rtol=1e-5)


def _logits_naive(q, k, idx, count, page, scale, key_mask):  # type: ignore[no-untyped-def]
    """(B, H, N_q, n * page) float64 scores at their index-list columns, -inf where not allowed."""
    b, h, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    n = idx.shape[2]
    out = torch.full((b, h, n_q, n * page), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hh in range(h):
            for e in range(n if count is None else int(count[bi, hh // (h // h_kv)])):
                p = int(idx[bi, hh // (h // h_kv), e])
                for o in range(page):
                    t = p * page + o
                    if p < 0 or t >= n_k or (key_mask is not None and key_mask[bi, t] <= 0):
                        continue
                    for i in range(n_q):
                        if t <= i + n_k - n_q:
                            s = q[bi, hh, i].double() @ k[bi, hh // (h // h_kv), t].double()
                            out[bi, hh, i, e * page + o] = scale * s
    return out


@pytest.mark.parametrize(
    ("case", "with_count", "masked"),
    [
        ((2, 4, 2, 2, 70, 16, 4, 9, torch.float32), True, False),
        ((1, 4, 2, 1, 40, 16, 1, 17, torch.bfloat16), False, True),
    ],
    ids=["gqa-page4-count", "bf16-tokens-padding"],
)
def test_kernel_writes_the_scores_it_attends_with(case: tuple, with_count: bool, masked: bool) -> None:
    """decode_attention_logits: the same output and lse as decode_attention, its logits equal to the scores
    at their index-list columns (-inf exactly where not allowed), and logsumexp(logits) == lse."""
    from attnlab.kernels.decode.op import decode_attention, decode_attention_logits

    b, h, h_kv, n_q, n_k, d, page, n, dtype = case
    q, k, v = _qkv(b, h, h_kv, n_q, n_k, d, dtype)
    idx = _index(b, h_kv, -(-n_k // page), n)
    count = torch.tensor([[n, n - 3]] * b, device=DEVICE, dtype=torch.int32) if with_count else None
    key_mask = None
    if masked:
        key_mask = torch.ones(b, n_k, device=DEVICE)
        key_mask[:, :5] = 0  # left padding
    out, lse, logits = decode_attention_logits(q, k, v, idx, count, page, 0.3, True, key_mask)
    want_out, want_lse = decode_attention(q, k, v, idx, count, page, 0.3, True, key_mask)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    want = _logits_naive(
        q.cpu(), k.cpu(), idx.cpu(), None if count is None else count.cpu(), page, 0.3, key_mask
    )
    got = logits.double().cpu()
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isfinite(want).any())
    fin = torch.isfinite(want)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[fin], want[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(torch.logsumexp(logits, -1), lse, atol=1e-4, rtol=1e-5)
    # group_max: each token's maximum over its KV group's query heads and queries, from the same launch
    out_g, lse_g, gmax = decode_attention_logits(
        q, k, v, idx, count, page, 0.3, True, key_mask, group_max=True
    )
    assert torch.equal(out_g, out) and torch.equal(lse_g, lse) and gmax.shape == (b, h_kv, n * page)
    want_g = want.unflatten(1, (h_kv, -1)).amax(dim=(2, 3))
    got_g = gmax.double().cpu()
    assert torch.equal(torch.isinf(got_g), torch.isinf(want_g))
    fin = torch.isfinite(want_g)
    torch.testing.assert_close(got_g[fin], want_g[fin], atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "case",
    [
        (2, 4, 2, 1, 700, 16, 4, 90, torch.float32),
        (1, 16, 2, 9, 200, 16, 2, 40, torch.float32),
        (2, 2, 2, 2, 300, 16, 16, 12, torch.bfloat16),
    ],
    ids=["gqa", "two-row-blocks", "bf16-page16"],
)
def test_kernel_merges_its_splits_in_one_launch(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a counter the split-K kernel merges its own partials (no merge launch): the same output and lse
    as the two launches, the counters left zero, and a second call on the same counters right too."""
    from attnlab.kernels.decode import op

    monkeypatch.setattr(op, "FUSED_MERGE", True)
    b, h, h_kv, n_q, n_k, d, page, n, dtype = case
    q, k, v = _qkv(b, h, h_kv, n_q, n_k, d, dtype)
    idx = _index(b, h_kv, -(-n_k // page), n)
    count = torch.randint(0, n + 1, (b, h_kv), device=DEVICE, dtype=torch.int32)
    count[0, 0] = n
    monkeypatch.setattr(op, "_target_programs", lambda q: 64)  # several splits to merge
    assert op.plan_splits(n, page, 2 * b * h_kv, 64)[2] > 1
    want, want_lse = op.decode_attention(q, k, v, idx, count, page, 0.3, True)
    counter = torch.zeros(8 * b * h_kv, dtype=torch.int32, device=DEVICE)

    class NoMergeLaunch:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("the merge kernel was launched")

    merge_kernel = op.decode_merge_kernel
    monkeypatch.setattr(op, "decode_merge_kernel", NoMergeLaunch())
    for _ in range(2):
        out, lse = op.decode_attention(q, k, v, idx, count, page, 0.3, True, counter=counter)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-6, rtol=1e-6)
        assert not counter.any()
    with pytest.raises(ValueError, match="counter must be contiguous int32"):
        op.decode_attention(q, k, v, idx, count, page, 0.3, True, counter=counter.long())
    monkeypatch.setattr(op, "decode_merge_kernel", merge_kernel)  # a counter too short: the two launches
    short = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out2, _ = op.decode_attention(q, k, v, idx, count, page, 0.3, True, counter=short)
    torch.testing.assert_close(out2, want, atol=1e-6, rtol=1e-6)


def test_merge_in_channel_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge launch with several programs per row (``MERGE_BLOCK_D`` < D): the naive twin's output and
    lse."""
    from attnlab.kernels.decode import op

    monkeypatch.setattr(op, "MERGE_BLOCK_D", 16)
    monkeypatch.setattr(op, "_target_programs", lambda q: 64)
    q, k, v = _qkv(1, 4, 2, 2, 400, 64, torch.float32)
    idx = _index(1, 2, 100, 60)
    out, lse = op.decode_attention(q, k, v, idx, None, 4, 0.2, True)
    want, want_lse = decode_attention_naive(q, k, v, idx, 4, 0.2, True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_key_mask_hides_padding(dtype: torch.dtype) -> None:
    from attnlab.kernels.decode.op import decode_attention

    q, k, v = _qkv(2, 4, 2, 2, 40, 16, torch.float32)
    idx = _index(2, 2, 10, 6, holes=False)
    key_mask = torch.ones(2, 40, device=DEVICE)
    key_mask[0, :13] = 0  # batch 0 left-padded by 13 tokens
    key_mask[1, 20:22] = 0
    out, lse = decode_attention(q, k, v, idx, None, 4, 0.3, True, key_mask.to(dtype))
    want, want_lse = decode_attention_naive(q, k, v, idx, 4, 0.3, True, None, key_mask)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    unmasked, _ = decode_attention_naive(q, k, v, idx, 4, 0.3, True)
    assert not torch.allclose(want[0], unmasked[0])  # the padding mattered


def test_fully_masked_rows_give_zeros_and_minus_inf_lse() -> None:
    from attnlab.kernels.decode.op import decode_attention

    q, k, v = _qkv(1, 2, 1, 4, 12, 16, torch.float32)
    # only tokens 8..11 selected; causal: query 0 sits at position 8, so every query sees token 8 — except
    # with N_q = 4 over N_k = 12 a selection of tokens 10.. leaves queries 0-1 (positions 8, 9) empty
    idx = torch.tensor([[[10, 11]]], device=DEVICE, dtype=torch.int32)
    out, lse = decode_attention(q, k, v, idx, None, 1, 0.25, True)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    empty = torch.full((1, 1, 3), -1, device=DEVICE, dtype=torch.int32)
    out, lse = decode_attention(q, k, v, empty, None, 1, 0.25, True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_non_causal_kernel_and_tokens_past_the_end() -> None:
    from attnlab.kernels.decode.op import decode_attention

    q, k, v = _qkv(1, 2, 2, 2, 10, 16, torch.float32)
    idx = torch.tensor([[[2, 0], [1, 3]]], device=DEVICE, dtype=torch.int32)  # page 4: page 2 = tokens 8, 9
    out, lse = decode_attention(q, k, v, idx, None, 4, 0.25, False)
    want, want_lse = decode_attention_naive(q, k, v, idx, 4, 0.25, False)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert selected_mask(idx, 4, 10)[0, 1].tolist() == [False] * 4 + [True] * 4 + [False] * 2


@pytest.mark.parametrize("reduce_max", [True, False])
def test_page_scores_match_naive_and_bound_every_key(reduce_max: bool) -> None:
    from attnlab.kernels.decode.op import page_scores

    b, h, h_kv, n_q, d, page, n_pages = 2, 4, 2, 2, 24, 4, 37
    q = torch.randn(b, h, n_q, d, device=DEVICE)
    k = torch.randn(b, h_kv, n_pages * page, d, device=DEVICE)
    blocks = k.view(b, h_kv, n_pages, page, d)
    kmax, kmin = blocks.amax(3), blocks.amin(3)
    spare = torch.randn(b, h_kv, 5, d, device=DEVICE)  # buffers with capacity beyond the valid pages
    got = page_scores(q, torch.cat([kmax, spare], 2), torch.cat([kmin, spare], 2), n_pages, reduce_max)
    want = page_scores_naive(q, kmax, kmin, "max" if reduce_max else "mean")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if reduce_max:  # the bound holds for every key of the page and every query row of the group
        qk = torch.einsum("bgrd,bgtd->bgrt", q.view(b, h_kv, 2 * n_q, d), k)
        per_page = qk.view(b, h_kv, 2 * n_q, n_pages, page).amax(-1).amax(2)
        assert (per_page <= got + 1e-5).all()


@pytest.fixture(
    params=[(True, True, 1), (False, False, 1), (True, True, 3)], ids=["lean-early", "fp32-narrow", "tiles3"]
)
def kernel_flags(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, bool, int]:
    """Both scoring forms (``SCORE_LEAN``), both ends of the search for the keep-th score
    (``TOPK_EARLY_EXIT``), and scoring programs of one tile or of a loop over 3 (``SPLIT_TILES``, the
    two-launch selection: the last program's tiles partly past the row)."""
    from attnlab.kernels.decode import op

    lean, early, tiles = request.param
    monkeypatch.setattr(op, "SCORE_LEAN", lean)
    monkeypatch.setattr(op, "TOPK_EARLY_EXIT", early)
    monkeypatch.setattr(op, "SPLIT_TILES", tiles)
    return lean, early, tiles


@pytest.mark.parametrize(("n", "k"), [(37, 5), (300, 17), (8, 8), (1, 1), (700, 350), (2, 1)])
def test_row_topk_matches_naive_with_ties_and_infinities(n: int, k: int, kernel_flags: tuple) -> None:
    from attnlab.kernels.decode.op import row_topk

    x = torch.randn(3, 2, n, device=DEVICE)
    x[0, 0, : min(n, 6)] = 1.5  # ties at the top
    x[1, 0] = 0.0  # a row of ties: the lowest positions
    x[2, 1, -1] = float("inf")
    x[2, 1, 0] = float("-inf")
    x[2, 0, : n // 2] = -x[2, 0, : n // 2].abs()  # negatives order too
    adjacent = 1.0 + torch.randperm(n, device=DEVICE).float() * 2**-23  # neighbouring floats: keys 1 apart
    x[0, 1] = adjacent.repeat_interleave(2)[:n] if n > 2 else adjacent  # ... and pairs of ties among them
    got = row_topk(x, k)
    assert torch.equal(got, row_topk_naive(x, k))
    assert torch.equal(got[1, 0], torch.arange(k, device=DEVICE, dtype=torch.int32))


@pytest.mark.parametrize("early", [True, False], ids=["early-exit", "narrow-to-one"])
def test_row_topk_keys_that_differ_in_one_byte_only(early: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose values share their top bytes and differ in the lowest one only (neighbouring keys: the
    bracket must narrow to one key), differ in the top byte only (sign and exponent: negatives, +-0,
    infinities), and a k-th value tied across many positions (no threshold has exactly k keys above
    it: the search must not stop early): the positions equal the naive rule's."""
    from attnlab.kernels.decode import op

    monkeypatch.setattr(op, "TOPK_EARLY_EXIT", early)
    n = 600
    base = torch.full((n,), 3.0, device=DEVICE)
    low_byte = (base.view(torch.int32) + torch.randint(0, 256, (n,), device=DEVICE, dtype=torch.int32)).view(
        torch.float32
    )
    signs = torch.tensor([-0.0, 0.0, -1.0, 1.0, float("inf"), float("-inf"), -2.0, 2.0], device=DEVICE)
    top_byte = signs[torch.randint(0, 8, (n,), device=DEVICE)]
    tied = torch.randn(n, device=DEVICE)
    tied[100:400] = 0.5  # the k-th value below sits inside this run of ties
    tied[:50] = 9.0
    x = torch.stack([low_byte, top_byte, tied])
    for k in (1, 7, 64, 200, 599, 600):
        assert torch.equal(op.row_topk(x, k), row_topk_naive(x, k)), k
    zeros = torch.tensor([-0.0, 0.0, 1.0, -0.0, 0.0, -1.0] * 3, device=DEVICE)[None]  # the cut among +-0
    for k in (2, 4, 7):
        assert torch.equal(op.row_topk(zeros, k), row_topk_naive(zeros, k)), k


SELECT_CASES = [
    # b, h, h_kv, n_q, n_k, d, page, keep, stale pages, key mask, reduce_max
    (2, 4, 2, 1, 300, 16, 4, 20, 1, False, True),  # 75 pages: several scoring programs per row
    (1, 6, 2, 3, 150, 24, 8, 5, 2, True, True),  # 3 queries, odd head dim, left padding
    (2, 2, 2, 2, 61, 16, 1, 9, 3, False, False),  # token pages, mean over the group
    (1, 8, 2, 1, 100, 16, 16, 7, 0, True, True),  # nothing stale: the summaries as given
]


@pytest.mark.parametrize("rank", ["fused", "triton"])
@pytest.mark.parametrize("dot", [False, True], ids=["elementwise", "dot"])
@pytest.mark.parametrize("case", SELECT_CASES, ids=[f"case{i}" for i in range(len(SELECT_CASES))])
def test_page_select_updates_scores_and_picks_the_top_pages(
    case: tuple, dot: bool, rank: str, kernel_flags: tuple
) -> None:
    """The fused selection kernel: stale summaries recomputed (padding left out), every page's bound equal
    to the naive twin's (forced pages +inf, padding-only pages -inf), and the positions of the top ``keep``
    scores ascending with ties to the lowest (row_topk_naive over the kernel's own scores). Twice: the
    row counters are left at zero, so a second launch (a CUDA-graph replay) selects again. ``dot``: the
    bounds as tensor-core products."""
    from attnlab.kernels.decode.op import page_select_launch
    from attnlab.state.pages import summarize

    b, h, h_kv, n_q, n_k, d, page, keep, stale, with_mask, reduce_max = case
    q, k, _ = _qkv(b, h, h_kv, n_q, n_k, d, torch.float32)
    key_mask = None
    if with_mask:
        key_mask = torch.ones(b, n_k, device=DEVICE)
        key_mask[0, : 2 * page + 3] = 0  # left padding: two padding-only pages and a partial one
    n_pages = -(-n_k // page)
    first = n_pages - stale
    summary = summarize(k, page, None, key_mask)
    want_max, want_min = (t.clone() for t in summary.valid())
    summary.kmax[:, :, first:n_pages] = 7.0  # stale pages: the kernel must recompute them
    summary.kmin[:, :, first:n_pages] = -7.0
    counter = torch.zeros(b * h_kv, device=DEVICE, dtype=torch.int32)
    first_forced = (n_k - n_q) // page
    for _ in range(2):
        index, scores = page_select_launch(q, k, summary.kmax, summary.kmin, counter, page, keep,
                                           first_forced, first, reduce_max, key_mask, dot=dot,
                                           rank=rank)  # fmt: skip
        assert torch.equal(summary.kmax[:, :, :n_pages], want_max)
        assert torch.equal(summary.kmin[:, :, :n_pages], want_min)
        want = page_scores_naive(q, want_max, want_min, "max" if reduce_max else "mean")
        if key_mask is not None:
            real = key_mask > 0
            real = torch.nn.functional.pad(real, (0, n_pages * page - n_k)).view(b, n_pages, page).any(-1)
            want = want.masked_fill(~real[:, None], float("-inf"))
            assert torch.isneginf(scores[0, :, :2]).all()
        want[..., first_forced:] = float("inf")
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(index, row_topk_naive(scores, keep))
        assert torch.equal(counter, torch.zeros_like(counter))


@pytest.mark.parametrize("dot", [False, True], ids=["elementwise", "dot"])
def test_page_select_bf16_with_padding(dot: bool, kernel_flags: tuple) -> None:
    """bf16 cache and summaries (the GPU case): bounds in fp32 from the bf16 summaries equal the naive
    twin's up to summation order, padding-only pages -inf, positions the rule over the kernel's scores."""
    from attnlab.kernels.decode.op import page_select_launch
    from attnlab.state.pages import summarize

    q, k, _ = _qkv(1, 8, 2, 1, 256, 128, torch.bfloat16)
    key_mask = torch.ones(1, 256, device=DEVICE)
    key_mask[0, :40] = 0
    summary = summarize(k, 16, None, key_mask)
    counter = torch.zeros(2, device=DEVICE, dtype=torch.int32)
    index, scores = page_select_launch(q, k, summary.kmax, summary.kmin, counter, 16, 5, 15, 16, True,
                                       key_mask, dot=dot)  # fmt: skip
    want = page_scores_naive(q, *summary.valid(), "max")
    assert torch.isneginf(scores[0, :, :2]).all()
    torch.testing.assert_close(scores[..., 2:15], want[..., 2:15], atol=1e-3, rtol=1e-5)
    assert torch.equal(index, row_topk_naive(scores, 5))


def test_page_select_two_launch_and_torch_ranking_pick_the_same_pages(kernel_flags: tuple) -> None:
    """rank="triton" (scores, then row_topk) gives the fused launch's positions; rank="torch" (what rows
    longer than MAX_SELECT_ROW get) the same set."""
    from attnlab.kernels.decode.op import page_select_launch
    from attnlab.state.pages import summarize

    q, k, _ = _qkv(1, 4, 2, 1, 200, 16, torch.float32)
    summary = summarize(k, 4)
    counter = torch.zeros(2, device=DEVICE, dtype=torch.int32)
    fused, scores = page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 11, 49, 50, True)
    two, scores2 = page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 11, 49, 50, True,
                                      rank="triton")  # fmt: skip
    ranked, scores3 = page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 11, 49, 50, True,
                                         rank="torch")  # fmt: skip
    assert torch.equal(scores, scores2) and torch.equal(scores, scores3)
    assert torch.equal(fused, two)
    assert torch.equal(fused, ranked.sort(-1).values)
    two_dot, scores4 = page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 11, 49, 50, True,
                                          rank="triton", dot=True)  # fmt: skip
    torch.testing.assert_close(scores4, scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(two_dot, row_topk_naive(scores4, 11))
    with pytest.raises(ValueError, match="rank='heap'; expected 'fused', 'triton' or 'torch'"):
        page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 11, 49, 50, True, rank="heap")


@pytest.mark.parametrize("rank", ["fused", "triton"])
def test_page_select_program_order_does_not_change_the_selection(
    rank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SCORE_LAST_FIRST`` off (the order rows of more than 65535 blocks take): the same summaries, scores
    and pages, the fused ranking's counters left zero."""
    from attnlab.kernels.decode import op
    from attnlab.state.pages import summarize

    q, k, _ = _qkv(2, 4, 2, 1, 300, 16, torch.float32)
    results = []
    for last_first in (True, False):
        monkeypatch.setattr(op, "SCORE_LAST_FIRST", last_first)
        summary = summarize(k, 4)  # (pages 72.. recomputed by the kernel as a decode step would)
        counter = torch.zeros(4, device=DEVICE, dtype=torch.int32)
        idx, scores = op.page_select_launch(q, k, summary.kmax, summary.kmin, counter, 4, 9, 74, 72, True,
                                            rank=rank)  # fmt: skip
        assert not counter.any()
        results.append((idx, scores, summary.kmax[:, :, :75].clone()))
    (i1, s1, m1), (i2, s2, m2) = results
    assert torch.equal(i1, i2) and torch.equal(s1, s2) and torch.equal(m1, m2)


def test_page_select_refuses_bad_arguments() -> None:
    from attnlab.kernels.decode.op import MAX_FUSED_UPDATE, page_select

    q, k, _ = _qkv(1, 4, 2, 1, 200, 16, torch.float32)
    kmax = torch.zeros(1, 2, 50, 16, device=DEVICE)
    counter = torch.zeros(2, device=DEVICE, dtype=torch.int32)
    with pytest.raises(ValueError, match="page=3 must be a power of two"):
        page_select(q, k, kmax, kmax.clone(), counter, 3, 4, 49, 50)
    with pytest.raises(ValueError, match=r"kmax \(1, 2, 50, 16\) and kmin .* must be \(B, H_kv, >= 100, D\)"):
        page_select(q, k, kmax, kmax.clone(), counter, 2, 4, 99, 100)
    with pytest.raises(ValueError, match="keep=51, first_update=50 for 50 pages"):
        page_select(q, k, kmax, kmax.clone(), counter, 4, 51, 49, 50)
    with pytest.raises(ValueError, match=f"at most {MAX_FUSED_UPDATE} pages to update"):
        page_select(q, k, kmax, kmax.clone(), counter, 4, 5, 49, 50 - MAX_FUSED_UPDATE - 1)
    with pytest.raises(ValueError, match=r"counter must be \(B \* H_kv,\) = \(2,\) int32"):
        page_select(q, k, kmax, kmax.clone(), counter.long(), 4, 5, 49, 50)


def test_custom_ops_compile_without_graph_breaks() -> None:
    from attnlab.kernels.decode.op import decode_attention, page_scores, page_select, row_topk

    q, k, v = _qkv(1, 4, 2, 1, 40, 16, torch.float32)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kb = k.view(1, 2, 10, 4, 16)
        scores = page_scores(q, kb.amax(3), kb.amin(3), 10, True)
        return decode_attention(q, k, v, row_topk(scores, 3), None, 4, 0.25, True)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), step(q, k, v))

    kb = k.view(1, 2, 10, 4, 16)
    kmax, kmin = kb.amax(3).contiguous(), kb.amin(3).contiguous()
    counter = torch.zeros(2, device=DEVICE, dtype=torch.int32)

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        index, _ = page_select(q, k, kmax, kmin, counter, 4, 3, 9, 9, True)
        return decode_attention(q, k, v, index, None, 4, 0.25, True)[0]

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fused(q, k, v))


def test_custom_ops_fake_outputs_match_the_real_ones_for_a_transposed_q() -> None:
    """The decode op's fake (torch.compile's shape and stride rule) gives the real outputs' shapes, dtypes and
    strides, also for a q that is a transposed view ((B, N, H, D) -> (B, H, N, D), as Hugging Face hands it)."""
    from attnlab.kernels.decode.op import decode_select_fwd

    q0, k, v = _qkv(1, 4, 2, 3, 40, 16, torch.float32)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, N, H, D) memory
    assert not q.is_contiguous() and q.stride(-1) == 1
    args = (q, k, v, _index(1, 2, 10, 3), None, 4, 0.25, True, None)
    torch.library.opcheck(decode_select_fwd, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_decode_step_captures_in_a_cuda_graph() -> None:
    from attnlab.kernels.decode.op import decode_attention, page_select
    from attnlab.state.pages import summarize

    q, k, v = _qkv(2, 8, 2, 1, 4096, 128, torch.bfloat16)
    state = summarize(k[:, :, :4095], 16)

    def step() -> torch.Tensor:  # the last page's summary recomputed, scores, top pages, attention
        top, _ = page_select(q, k, state.kmax, state.kmin, state.select_counter(), 16, 32, 255, 255, True)
        return decode_attention(q, k, v, top, None, 16, 0.088, True, counter=state.merge_counter())[0]

    want = step()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want)


def test_split_plan_for_active_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan_splits without the cap (rows of equal work, ``active_rows``): about the target programs over the
    rows that read, no split under MIN_SPLIT_TOKENS; with the cap, no split over MAX_SPLIT_TOKENS."""
    from attnlab.kernels.decode import op

    monkeypatch.setattr(op, "IMPORTED_INTERPRETED", False)  # (planned for a GPU's 64-token key tile)
    one_row = op.plan_splits(2048, 64, 1, 528, capped=False)  # one 128K row in 64-token entries
    assert one_row[2] == 131072 // op.MIN_SPLIT_TOKENS and one_row[1] * 64 == op.MIN_SPLIT_TOKENS
    eight = op.plan_splits(2048, 64, 8, 528, capped=False)
    assert eight[2] == 64 and eight[1] * 64 == 2048  # 528 / 8 -> 66 splits, whole steps: 64 of 2048
    capped = op.plan_splits(131072, 1, 8, 528)
    assert capped[1] * 1 <= op.MAX_SPLIT_TOKENS and capped[2] * capped[1] >= 131072
