"""H2O's one-launch per-step eviction (``attnlab.kernels.decode.evict``) against its naive twin, and the per-step
method through it against the torch backend over a decoding loop (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core import Result
from attnlab.kernels.decode.evict import h2o_evict_one, h2o_evict_one_naive
from attnlab.testing import device_under_test

DEVICE = device_under_test()


@pytest.mark.parametrize(("n_q", "recent", "normalize", "padded"), [(1, 0, True, False), (2, 3, False, True)])
def test_kernel_matches_naive(n_q: int, recent: int, normalize: bool, padded: bool) -> None:
    """Logits with -inf entries (causal / padding) and a row whose lse is -inf; 37 candidates over three
    blocks of 16 in the interpreter: the same kept tokens (in order), scores and counts as the twin."""
    torch.manual_seed(0)
    b, h, h_kv, c = 2, 4, 2, 37
    logits = torch.randn(b, h, n_q, c, device=DEVICE)
    logits[0, :, :, 5] = float("-inf")
    logits[1, 2:, :, :] = float("-inf")  # KV head 1 of batch 1: nothing allowed (lse -inf)
    lse = torch.logsumexp(logits, -1)
    cand = torch.stack([torch.randperm(60)[:c].sort().values for _ in range(b * h_kv)]).view(b, h_kv, c)
    cand = cand.to(DEVICE, torch.int32)
    prev_score = torch.rand(b, h_kv, c - n_q, device=DEVICE)
    prev_seen = torch.randint(1, 5, (b, h_kv, c - n_q), device=DEVICE).float()
    key_mask = None
    if padded:
        key_mask = torch.ones(b, 60, device=DEVICE)
        key_mask[1, :9] = 0
    import attnlab.kernels.decode.evict as ev

    old = ev.EVICT_BLOCK
    ev.EVICT_BLOCK = 16
    try:
        got = h2o_evict_one(
            logits, lse, cand, prev_score, prev_seen, key_mask, recent=recent, normalize=normalize
        )
    finally:
        ev.EVICT_BLOCK = old
    want = h2o_evict_one_naive(
        logits, lse, cand, prev_score, prev_seen, key_mask, recent=recent, normalize=normalize
    )
    assert torch.equal(got[0], want[0]) and got[0].shape == (b, h_kv, c - 1)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    assert torch.equal(got[2], want[2])


def test_per_step_loop_on_the_kernel_matches_the_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of one query past the budget (one token dropped per step: the one-launch path, which
    every step takes): the same kept tokens, scores and outputs as the torch backend."""
    import attnlab.kernels.decode.evict as ev

    launches = []
    real = ev.h2o_evict_one
    monkeypatch.setattr(ev, "h2o_evict_one", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    torch.manual_seed(1)
    n0, steps = 24, 5
    q = torch.randn(2, 8, n0 + steps, 16, device=DEVICE)
    k = torch.randn(2, 2, n0 + steps, 16, device=DEVICE)
    v = torch.randn_like(k)
    kw = {"method": "h2o", "causal": True, "budget": 12, "recent": 3, "per_step": True}
    states: dict[str, object] = {"triton": None, "torch": None}
    for end in range(n0, n0 + steps + 1):
        first = 0 if end == n0 else end - 1
        res = {}
        for be in states:
            r = attnlab.attention(
                q[:, :, first:end], k[:, :, :end], v[:, :, :end], backend=be, state=states[be], **kw
            )
            assert isinstance(r, Result)
            res[be], states[be] = r, r.state
        a, b = states["triton"], states["torch"]
        assert torch.equal(a.kept, b.kept)  # type: ignore[attr-defined]
        torch.testing.assert_close(a.score, b.score, atol=1e-6, rtol=1e-5)  # type: ignore[attr-defined]
        torch.testing.assert_close(res["triton"].out, res["torch"].out, atol=1e-5, rtol=1e-5)
    assert len(launches) == steps  # (the first call decides on the fp32 path; every step after it)
