"""The block selection of the pooled-score estimators: the Triton pass against the PyTorch rule.

On CPU the pass runs in Triton's interpreter on small grids; on CUDA the same tests run on the GPU, plus
the 128K grid that block_topk's estimator makes (B=1, H=32, 1024 x 1024 tiles)."""

from __future__ import annotations

import pytest
import torch

from attnlab.kernels.block_select.naive import select_blocks_naive
from attnlab.kernels.block_select.op import kernel_applies, select_blocks, select_blocks_kernel
from attnlab.testing import device_under_test

DEVICE = device_under_test()


def _both(score: torch.Tensor, **kw: object) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return select_blocks_kernel(score, **kw), select_blocks_naive(score, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("n_q", "n_k", "block"),
    [(256, 256, 16), (100, 300, 16), (1000, 1000, 64), (48, 16, 16), (64, 88, 16), (50, 40, 16)],
)
# (topk 1 with both sink and local forced is left out: two +inf tiles for one place, a tie)
@pytest.mark.parametrize(
    ("sink", "local", "topk"),
    [
        (True, True, 3),
        (True, True, 40),
        (False, False, 1),
        (False, False, 3),
        (True, False, 1),
        (True, False, 40),
    ],
)
def test_kernel_equals_the_rule_on_distinct_scores(
    causal: bool, n_q: int, n_k: int, block: int, sink: bool, local: bool, topk: int
) -> None:
    nqb, nkb = -(-n_q // block), -(-n_k // block)
    score = torch.randn(2, 3, nqb, nkb, device=DEVICE)  # distinct values: no tie at the cut
    kw = dict(n_q=n_q, n_k=n_k, block=block, topk=topk, causal=causal, sink=sink, local=local)
    (kf, kp), (nf, np_) = _both(score, **kw)
    assert torch.equal(kf, nf) and torch.equal(kp, np_)
    assert not bool((kf & kp).any())
    if not causal:
        assert not bool(kp.any())


def test_kernel_keeps_the_lowest_columns_among_ties_and_counts_forced_tiles() -> None:
    # every score equal: after the forced sink and local tiles, the lowest allowed columns are kept
    score = torch.zeros(1, 1, 4, 8, device=DEVICE)
    full, partial = select_blocks_kernel(
        score, n_q=64, n_k=128, block=16, topk=4, causal=True, sink=True, local=True
    )
    keep = (full | partial)[0, 0].cpu()
    # query block i's last position is 64 + 16 i + 15 -> local block 4 + i; allowed blocks 0 .. 4 + i
    for i in range(4):
        want = {0, 1, 2, 4 + i}
        assert set(keep[i].nonzero().flatten().tolist()) == want
        assert bool(partial[0, 0, i, 4 + i]) and not bool(partial[0, 0, i, :4].any())


def test_a_query_block_straddling_two_key_blocks_forces_both_on_top_of_topk() -> None:
    # N_k - N_q = 24: query block i holds positions 24 + 16 i .. 39 + 16 i, key blocks i + 1 and i + 2; the
    # budget (topk 3) counts the sink and block i + 2, block i + 1 comes on top; equal scores: the lowest
    # allowed other column fills the one scored place
    score = torch.zeros(1, 1, 4, 6, device=DEVICE)
    kw = dict(n_q=64, n_k=88, block=16, topk=3, causal=True, sink=True, local=True)
    full, partial = select_blocks_kernel(score, **kw)  # type: ignore[arg-type]
    keep = (full | partial)[0, 0].cpu()
    want = [{0, 1, 2}, {0, 1, 2, 3}, {0, 1, 3, 4}, {0, 1, 4, 5}]  # (block 0 allows only 0 .. 2)
    assert [set(row.nonzero().flatten().tolist()) for row in keep] == want
    # the span straddles the diagonal: both its tiles are partial
    assert all(bool(partial[0, 0, i, i + 1]) and bool(partial[0, 0, i, i + 2]) for i in range(4))
    # the rule on distinct scores: the same forced tiles and budget
    score = torch.randn(1, 1, 4, 6, device=DEVICE)
    nf, np_ = select_blocks_naive(score, **kw)  # type: ignore[arg-type]
    kept = (nf | np_)[0, 0].cpu()
    assert kept.sum(-1).tolist() == [3, 4, 4, 4]
    assert all(bool(kept[i, [0, i + 1, i + 2]].all()) for i in range(4))
    # mass > 0 (the rule only): the span is forced there too
    mf, mp = select_blocks_naive(score, **{**kw, "mass": 1e-6})  # type: ignore[arg-type]
    assert all(bool((mf | mp)[0, 0, i, [0, i + 1, i + 2]].all().item()) for i in range(4))


def test_non_finite_scores_are_never_kept_unless_forced() -> None:
    score = torch.full((1, 1, 2, 6), float("-inf"), device=DEVICE)
    score[0, 0, :, 3] = 1.0
    (kf, kp), (nf, np_) = _both(score, n_q=32, n_k=96, block=16, topk=4, causal=False, sink=True, local=False)
    assert torch.equal(kf, nf) and torch.equal(kp, np_)
    assert (kf[0, 0].nonzero()[:, 1].tolist()) == [0, 3, 0, 3]


def test_dispatch_takes_the_rule_for_mass_and_off_cuda() -> None:
    score = torch.randn(1, 2, 4, 4, device=DEVICE)
    assert not kernel_applies(score, 2, 0.5)
    assert kernel_applies(score, 2, 0.0) == (DEVICE.type == "cuda")
    assert not kernel_applies(score, 100, 0.0)
    kw = dict(n_q=64, n_k=64, block=16, topk=2, causal=True, sink=True, local=True)
    got = select_blocks(score, mass=0.0, **kw)  # type: ignore[arg-type]
    want = select_blocks_naive(score, mass=0.0, **kw)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.cuda
def test_kernel_equals_the_rule_at_128k() -> None:
    score = torch.randn(1, 32, 1024, 1024, device=DEVICE)
    kw = dict(n_q=131072, n_k=131072, block=128, topk=16, causal=True, sink=True, local=True)
    (kf, kp), (nf, np_) = _both(score, **kw)
    assert torch.equal(kf, nf) and torch.equal(kp, np_)


def test_nan_scores_rank_highest_and_are_never_kept_unless_forced() -> None:
    # torch.topk ranks every NaN (either sign bit) above every number; the pass must pick the same tiles
    score = torch.randn(1, 1, 3, 8, device=DEVICE)
    score[0, 0, :, 2] = float("nan")
    score[0, 0, :, 5] = -float("nan")
    kw = dict(n_q=48, n_k=128, block=16, topk=4, causal=False, sink=False, local=False)
    (kf, kp), (nf, np_) = _both(score, **kw)
    assert torch.equal(kf, nf) and torch.equal(kp, np_)
    assert not bool(kf[..., 2].any()) and not bool(kf[..., 5].any())
