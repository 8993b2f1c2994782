"""Recycled Attention's one-launch full-step scores (``attnlab.kernels.decode.recycled_scores``) against the
PyTorch formula they replace (``attnlab.catalog.decode.recycled._scores_torch``): group maximum of
``exp(logits - lse)``, max pooling over key positions, padding -inf.

On CPU the kernel runs in Triton's interpreter on tiny shapes (conftest sets TRITON_INTERPRET=1), with small
blocks so that a call has several programs and the pooling window crosses their edges."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnlab.catalog.decode import recycled
from attnlab.kernels.decode.recycled_scores import recycled_scores
from attnlab.testing import device_under_test

DEVICE = device_under_test()
NEG = float("-inf")
#: Relative tolerance of the finite scores (the kernel's exp and PyTorch's differ by ulps).
RTOL = 4e-6  # tl.exp is approximate on CUDA (about 1e-6 relative at -15); ranking moves only at near-ties


def _inputs(
    b: int, h: int, n_q: int, n_k: int, *, wide: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, H, N_q, N_k) with causal-like -inf tails, one row all -inf, and the whole of KV head 1
    of batch 1 all -inf when there are two KV heads; lse (B, H, N_q) of them, -inf for those rows).
    ``wide``: the logits are a slice ``[..., :N_k]`` of a wider buffer, as ``attend_with_logits`` returns."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(b, h, n_q, n_k + (13 if wide else 0), generator=g) * 3.0
    buf[..., n_k:] = float("nan")  # (beyond the slice: must not be read)
    logits = buf.to(DEVICE)[..., :n_k]  # (moved whole: ``.to`` of a slice would make it contiguous)
    for i in range(n_q - 1):  # query i sees the tokens up to i + N_k - N_q
        logits[:, :, i, max(0, i + 1 + n_k - n_q) :] = NEG
    logits[0, -1, 0] = NEG  # a row with no allowed key
    if h >= 2:
        logits[-1, h // 2 :] = NEG  # batch 1's last KV head (H_kv = 2) sees nothing at all
    lse = torch.logsumexp(logits, dim=-1)
    assert torch.isneginf(lse).any()
    return logits, lse


def _valid(b: int, n_k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, n_k, generator=g) > 0.3
    valid[-1, : n_k // 3] = False  # left padding
    return valid.to(DEVICE)


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same -inf entries exactly, no NaN, the finite ones within RTOL."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any() and not torch.isposinf(got).any()
    inf = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), inf)
    torch.testing.assert_close(got[~inf], want[~inf], atol=0.0, rtol=RTOL)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("pool", [1, 3, 7])
def test_kernel_matches_the_torch_formula(group: int, n_q: int, pool: int) -> None:
    """2 batches x 2 KV heads; N_k not a multiple of the block (16, or 128 for 300), with and without
    padding, the logits contiguous and a slice of a wider buffer."""
    b, h_kv = 2, 2
    h = group * h_kv
    params = recycled.RecycledParams(budget=1, stride=1, pool=pool)
    # (N_k, block, wide, padded): one program per row of scores, or several (the window crossing edges)
    cases = ((1, 16, False, True), (5, 16, True, False), (37, 16, False, False), (300, 128, True, True))
    for n_k, block, wide, padded in cases:
        logits, lse = _inputs(b, h, n_q, n_k, wide=wide, seed=n_k + 7 * n_q + pool)
        assert (logits.stride(2) > n_k) == wide
        valid = _valid(b, n_k, seed=n_k) if padded else None
        got = recycled_scores(logits, lse, h_kv, pool, valid, block=block)
        want = recycled._scores_torch(logits, lse, h_kv, params, valid)
        _check(got, want)
        # batch 1's last KV head saw no key: 0 everywhere but padding
        dead = got[-1, -1] if valid is None else got[-1, -1][valid[-1]]
        assert (dead == 0).all()


def test_default_block_and_lse_not_finite() -> None:
    """The default block (one program per row of scores here); lse +inf / NaN count as 0 like -inf, as in
    the formula's ``torch.where(torch.isfinite(lse), lse, 0.0)``."""
    logits, lse = _inputs(2, 8, 2, 37, wide=True, seed=3)
    lse[0, 1, 0], lse[1, 0, 1] = float("inf"), float("nan")
    params = recycled.RecycledParams(budget=1, stride=1, pool=7)
    valid = _valid(2, 37, seed=4)
    _check(recycled_scores(logits, lse, 2, 7, valid), recycled._scores_torch(logits, lse, 2, params, valid))


def test_fused_full_step_uses_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton backend's fused full step scores through the kernel (once), and keeps the top-k tokens of
    the kernel's scores (the kernel's agreement with the PyTorch formula is the tests above)."""
    import attnlab
    import attnlab.kernels.decode.recycled_scores as rs

    calls: list[torch.Tensor] = []
    real = rs.recycled_scores

    def spy(*a: Any, **kw: Any) -> torch.Tensor:
        out = real(*a, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(rs, "recycled_scores", spy)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 2, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 2, 40, 16, generator=g).to(DEVICE)
    mask = torch.ones(1, 40, device=DEVICE)
    mask[0, :5] = 0.0
    res = attnlab.attention(
        q, k, k.flip(2), method="recycled", causal=True, scale=0.25, backend="triton",
        budget=10, stride=2, pool=1, key_mask=mask,
    )  # fmt: skip
    assert len(calls) == 1 and calls[0].shape == (1, 2, 40)
    assert isinstance(res, attnlab.core.Result)
    want = calls[0].topk(10, dim=-1).indices.sort(-1).values
    assert torch.equal(res.state.positions.long().sort(-1).values, want)


def test_pools_wider_than_the_kernel_unrolls_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool above MAX_POOL (the kernel unrolls its shifts) is scored by the PyTorch formula; up to it, by
    the kernel."""
    import attnlab.kernels.decode.recycled_scores as rs

    calls: list[int] = []
    real = rs.recycled_scores
    monkeypatch.setattr(rs, "recycled_scores", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    logits, lse = _inputs(1, 4, 2, 40, wide=False, seed=6)
    for pool in (rs.MAX_POOL, rs.MAX_POOL + 2):
        params = recycled.RecycledParams(pool=pool)
        got = recycled._fused_scores(logits, lse, 2, params, None)
        _check(got, recycled._scores_torch(logits, lse, 2, params, None))
    assert calls == [rs.MAX_POOL]
    with pytest.raises(ValueError, match="MAX_POOL"):  # the kernel itself refuses what it would unroll
        real(logits, lse, 2, rs.MAX_POOL + 2, None)
