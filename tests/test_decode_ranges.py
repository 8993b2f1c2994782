"""The split-K decode kernel's RANGES mode (rows of contiguous token runs: the whole cache, or sinks + a
recent window; retrieval_heads_kv's step) against the naive twin given the same tokens as index lists.

Splits are forced small (``MIN_SPLIT_TOKENS`` / ``MAX_SPLIT_TOKENS`` patched) so that full rows take many
splits and window rows few, in one launch: the merge must read each row's own splits only (unwritten
partials are NaN-poisoned)."""

from __future__ import annotations

import pytest
import torch

from attnlab.kernels.decode import op
from attnlab.kernels.decode.naive import decode_attention_naive
from attnlab.testing import device_under_test

DEVICE = device_under_test()


def _lists(full: torch.Tensor, first: torch.Tensor, sink: int, win: int, n_k: int) -> torch.Tensor:
    """(B, H_kv, N_k) int32 token lists (-1 padded) of the rows RANGES describes, built independently."""
    b, h_kv = first.shape[0], full.shape[1]
    idx = torch.full((b, h_kv, n_k), -1, dtype=torch.int32)
    for i in range(b):
        f = int(first[i])
        stream = [t for t in range(f, min(f + sink, win))] + list(range(win, n_k))
        for h in range(h_kv):
            toks = list(range(n_k)) if bool(full[min(i, full.shape[0] - 1), h]) else stream
            idx[i, h, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
    return idx.to(DEVICE)


CASES = [
    # b, h, h_kv, n_q, n_k, d, sink, win, full rows (expanded to B rows?), first, dtype, active
    (1, 8, 4, 1, 300, 16, 4, 260, ([[1, 0, 0, 0]], True), None, torch.float32, 1),  # one full KV head
    (
        2,
        4,
        2,
        3,
        150,
        24,
        2,
        120,
        ([[0, 1], [1, 1]], False),
        None,
        torch.float32,
        None,
    ),  # per batch, 3 queries
    (2, 4, 2, 1, 200, 16, 4, 150, ([[0, 0]], True), [3, 0], torch.float32, 0),  # no full row, left padding
    (
        2,
        4,
        4,
        2,
        90,
        16,
        8,
        85,
        ([[0, 1, 0, 0]], False),
        [0, 80],
        torch.bfloat16,
        2,
    ),  # (1, H_kv); sinks in window
    (
        1,
        4,
        2,
        1,
        64,
        16,
        0,
        1,
        ([[0, 1]], False),
        None,
        torch.float32,
        1,
    ),  # no sink, window = all but token 0
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_ranges_match_naive(case: tuple, poison_empty: None, monkeypatch: pytest.MonkeyPatch) -> None:
    b, h, h_kv, n_q, n_k, d, sink, win, rows, first, dtype, active = case
    monkeypatch.setattr(op, "MIN_SPLIT_TOKENS", 32)
    monkeypatch.setattr(op, "MAX_SPLIT_TOKENS", 32)
    q = torch.randn(b, h, n_q, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype)
    full = torch.tensor(rows[0], dtype=torch.bool, device=DEVICE)
    if rows[1]:
        full = full.expand(b, h_kv)  # (a stride-0 batch dim, as retrieval_heads_kv passes its heads mask)
    starts = torch.tensor(first if first is not None else [0] * b, device=DEVICE)
    key_mask = None
    if first is not None:
        key_mask = (torch.arange(n_k, device=DEVICE)[None, :] >= starts[:, None]).float()
    ranges = op.Ranges(full, starts if first is not None else None, sink, win)
    out, lse = op.decode_ranges(q, k, v, ranges, 0.3, True, key_mask, active)
    idx = _lists(full.cpu(), starts.cpu(), sink, win, n_k)
    want, want_lse = decode_attention_naive(q, k, v, idx, 1, 0.3, True, key_mask=key_mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


def test_window_rows_use_fewer_splits_than_full_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """One launch plans splits for the full rows; a window row's count of splits (what the merge reads)
    covers its own list only."""
    monkeypatch.setattr(op, "MIN_SPLIT_TOKENS", 32)
    seen: dict[str, torch.Tensor] = {}
    merge = op.decode_merge_kernel

    class Spy:
        def __getitem__(self, grid: tuple) -> object:
            def run(*args: object, **kw: object) -> None:
                seen["n_split"] = kw["NSPLIT"].clone()  # type: ignore[union-attr]
                merge[grid](*args, **kw)

            return run

    monkeypatch.setattr(op, "decode_merge_kernel", Spy())
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 256, 16, device=DEVICE) for _ in range(2))
    full = torch.tensor([[True, False]], device=DEVICE)
    op.decode_ranges(q, k, v, op.Ranges(full, None, 4, 240), 0.25, True, None, 1)
    n_full, n_window = seen["n_split"].tolist()
    assert n_full > n_window >= 1
    _, per_split, splits = op.plan_splits(256, 1, 1, op._target_programs(q), capped=False)
    assert n_full == splits and n_window == -(-(4 + 16) // per_split)


def test_ranges_refuse_bad_arguments() -> None:
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 64, 16, device=DEVICE) for _ in range(2))
    full = torch.zeros(1, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"need 0 < win < N_k=64 and sink >= 0, got win=64"):
        op.decode_ranges(q, k, v, op.Ranges(full, None, 4, 64), 0.25, True)
    with pytest.raises(ValueError, match=r"ranges.full \(1, 3\) .* must be \(B or 1, H_kv\)"):
        op.decode_ranges(q, k, v, op.Ranges(torch.zeros(1, 3, dtype=torch.bool), None, 4, 8), 0.25, True)
    with pytest.raises(ValueError, match=r"ranges.first \(2,\) must be \(B,\) = \(1,\)"):
        op.decode_ranges(q, k, v, op.Ranges(full, torch.zeros(2, dtype=torch.long), 4, 8), 0.25, True)
    with pytest.raises(ValueError, match="an index list is needed without ranges"):
        op.decode_launch(q, k, v, None, None, 1, 0.25, True)


def test_a_full_row_under_a_no_full_row_plan_reads_only_written_splits(poison_empty: None) -> None:
    """``active_rows=0`` promises no full row; a full row given anyway must not make the merge read splits
    the launch did not write (the row's count of splits is capped at the grid's): a finite output."""
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 512, 16, device=DEVICE) for _ in range(2))
    full = torch.tensor([[True, False]], device=DEVICE)
    out, lse = op.decode_ranges(q, k, v, op.Ranges(full, None, 4, 480), 0.25, True, None, 0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_ranges_refuse_mismatched_q_k_v() -> None:
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k = torch.randn(1, 2, 64, 16, device=DEVICE)
    full = torch.zeros(1, 2, dtype=torch.bool, device=DEVICE)
    for kk, vv in ((k, k[..., :8]), (k, k[:, :1]), (torch.randn(1, 3, 64, 16, device=DEVICE),) * 2):
        with pytest.raises(ValueError, match=r"expected k and v of one shape"):
            op.decode_ranges(q, kk, vv, op.Ranges(full, None, 4, 8), 0.25, True)
