"""seer: the gate against the official AttnGate rewritten with torch's pooling ops, the selection on
planted structure (identity gate and a max-pooling projection), threshold and top-k modes, the local
block, bad input, and the executor / eager paths against the reference (forward, backward, bf16, cross,
GQA, with and without weights) through the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.catalog.dynamic.seer import SPEC, SeerParams, estimate, gate_probs
from attnlab.core import Result
from attnlab.errors import AttnlabError, ParamError
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()
N, BS, FAR, D = 128, 16, 2, 32  # 8 key blocks of 16; the planted block is block 2 (keys 32..47)


def official_gate(q, k, w_q, w_k, block: int, causal_blocks: bool):  # type: ignore[no-untyped-def]
    """microsoft/SeerAttention's ``AttnGate`` (Qavg_Kmaxminavg, two linears) rewritten with torch's pooling:
    avg/max/min pooling over ``block`` rows with ceil_mode, k poolings concatenated (max, min, avg), per-head
    (heads, in, hidden) projections, scores / sqrt(hidden), block-tril mask, softmax."""
    _, h, n, d = q.shape
    hk = k.shape[1]

    def pool(x, fn):  # type: ignore[no-untyped-def]
        y = fn(x.reshape(-1, n, d).transpose(1, 2), block, block, ceil_mode=True)  # (B*H, D, NB)
        return y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1, d)

    qp = pool(q, F.avg_pool1d)
    kp = torch.cat([pool(k, F.max_pool1d), -pool(-k, F.max_pool1d), pool(k, F.avg_pool1d)], dim=-1)
    gq = qp @ w_q[None]
    gk = (kp @ w_k.reshape(hk, 3 * d, -1)[None]).repeat_interleave(h // hk, dim=1)
    s = gq @ gk.transpose(-1, -2) / gq.shape[-1] ** 0.5
    if causal_blocks:
        nb = s.shape[-1]
        s = s.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), -1e9)
    return torch.softmax(s, dim=-1)


def test_gate_matches_the_official_attn_gate() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 45, 8, generator=g)  # 45 rows: a ragged last block of 13
    k = torch.randn(2, 2, 45, 8, generator=g)
    w_q = torch.randn(4, 8, 6, generator=g)
    w_k = torch.randn(2, 3, 8, 6, generator=g)
    for causal in (True, False):
        ours = gate_probs(q, k, SeerParams(block=16), causal=causal, w_q=w_q, w_k=w_k)
        theirs = official_gate(q, k, w_q, w_k, 16, causal)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def planted(spike: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 1, N, D): key block FAR holds direction u (in every row, or, with ``spike``, in one row
    only, which its mean dilutes 16x but its max keeps); the last query block looks for u."""
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(D)
    u[3] = 1.0
    k = 0.1 * torch.randn(1, 1, N, D, generator=g)
    if spike:
        k[:, :, FAR * BS + 5] += 6 * u
    else:
        k[:, :, FAR * BS : (FAR + 1) * BS] += 4 * u
    q = 0.1 * torch.randn(1, 1, N, D, generator=g)
    q[:, :, N - BS :] += 4 * u
    return q, k


def test_identity_gate_finds_the_planted_block() -> None:
    q, k = planted()
    plan = estimate(q, k, SeerParams(block=BS, topk=2), causal=True, scale=D**-0.5)
    tiles = plan.full | plan.partial
    assert tiles[0, 0, -1].nonzero().flatten().tolist() == [FAR, N // BS - 1]  # planted + local
    assert bool(plan.dense_mask()[0, 0, -1, FAR * BS : (FAR + 1) * BS].all())


def test_max_pooling_projection_finds_a_one_token_spike() -> None:
    q, k = planted(spike=True)
    p = SeerParams(block=BS, topk=2)
    eye = torch.eye(D)[None]
    w_q = eye.clone()
    w_k_max = torch.zeros(1, 3, D, D)
    w_k_max[0, 0] = 4 * torch.eye(D)  # the gate reads the block max only
    with_max = estimate(q, k, p, causal=True, scale=D**-0.5, w_q=w_q, w_k=w_k_max)
    assert bool((with_max.full | with_max.partial)[0, 0, -1, FAR])
    w_k_avg = torch.zeros(1, 3, D, D)
    w_k_avg[0, 2] = 4 * torch.eye(D)  # the block mean only: the spike is diluted below the noise
    gp = gate_probs(q, k, p, causal=True, w_q=w_q, w_k=w_k_avg)
    gm = gate_probs(q, k, p, causal=True, w_q=w_q, w_k=w_k_max)
    assert float(gm[0, 0, -1, FAR]) > 2 * float(gp[0, 0, -1, FAR])


def test_topk_threshold_and_local_block() -> None:
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 100, 16, generator=g), torch.randn(2, 2, 100, 16, generator=g)
    geo_rows = torch.arange(-(-100 // BS))
    for causal in (True, False):
        plan = estimate(q, k, SeerParams(block=BS, topk=3), causal=causal, scale=0.25)
        tiles = plan.full | plan.partial
        visible = geo_rows + 1 if causal else torch.full_like(geo_rows, 7)
        assert torch.equal(tiles.sum(-1), torch.clamp(visible, max=3).expand(2, 2, -1))
        assert bool(tiles[..., geo_rows, geo_rows].all())  # the local (diagonal) block
        prob = gate_probs(q, k, SeerParams(block=BS), causal=causal)
        thr = estimate(q, k, SeerParams(block=BS, threshold=0.15), causal=causal, scale=0.25)
        want = prob > 0.15
        want[..., geo_rows, geo_rows] = True
        assert torch.equal(thr.full | thr.partial, want)


def test_chunked_prefill_keeps_the_diagonal_span_on_top_of_topk() -> None:
    # N_k - N_q = 24: query block i (positions 24 + 16 i .. 39 + 16 i) straddles key blocks i + 1, i + 2;
    # both are kept (the reviewer's repro: topk=1 gave 32 zero rows), the second one on top of topk
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (64, 88, 88))
    out = attnlab.attention(q, k, v, method="seer", causal=True, block=16, topk=1, backend="reference")
    assert not bool((out.abs().sum(-1) == 0).any())
    for topk in (1, 2):
        plan = estimate(q, k, SeerParams(block=16, topk=topk), causal=True, scale=0.25)
        tiles = plan.full | plan.partial
        for i in range(4):
            assert bool(tiles[..., i, [i + 1, i + 2]].all())
            assert torch.equal(tiles[..., i, :].sum(-1), torch.full((1, 2), min(topk + 1, i + 3)))
    thr = estimate(q, k, SeerParams(block=16, threshold=0.9), causal=True, scale=0.25)
    assert bool((thr.full | thr.partial)[..., torch.arange(4), torch.arange(4) + 1].all())


def test_cross_causal_rows_without_keys_give_zeros() -> None:
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    out = attnlab.attention(q, k, v, method="seer", block=16, topk=2, causal=True, backend="reference")
    assert bool((out[:, :, :20] == 0).all()) and bool((out[:, :, 20:] != 0).any())


def test_return_plan_is_the_plan_run_with_the_weights() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    w_q, w_k = torch.randn(2, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    res = attnlab.attention(q, k, v, method="seer", block=16, topk=2, causal=True, backend="eager",
                            return_plan=True, w_q=w_q, w_k=w_k)  # fmt: skip
    assert isinstance(res, Result)
    want = estimate(q, k, SeerParams(block=16, topk=2), causal=True, scale=0.25, w_q=w_q, w_k=w_k)
    assert torch.equal(res.plan.full | res.plan.partial, want.full | want.partial)


def test_reference_log_sum_exp_uses_the_plan_of_the_weights() -> None:
    """The reference backend's lse comes from the gate run with the call's weights (estimate_inputs), not
    from the weightless gate."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    w_q, w_k = torch.randn(2, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    kw = {
        "method": "seer",
        "block": 16,
        "topk": 2,
        "causal": True,
        "backend": "reference",
        "return_lse": True,
    }
    res = attnlab.attention(q, k, v, w_q=w_q, w_k=w_k, **kw)  # type: ignore[arg-type]
    bare = attnlab.attention(q, k, v, **kw)  # type: ignore[arg-type]
    assert isinstance(res, Result) and isinstance(bare, Result) and res.lse is not None
    mask = estimate(
        q, k, SeerParams(block=16, topk=2), causal=True, scale=0.25, w_q=w_q, w_k=w_k
    ).dense_mask()
    want = torch.logsumexp((0.25 * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(res.lse, want)
    assert not torch.allclose(bare.lse, want)  # the weights change the plan here


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"block": 48}, "block=48"), ({"topk": 0}, "topk"), ({"threshold": 1.0}, "threshold"),
     ({"threshold": -0.1}, "threshold")],
)  # fmt: skip
def test_bad_parameters_get_clear_errors(kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="seer", causal=True, **kwargs)


def test_bad_weights_get_clear_errors() -> None:
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    p = SeerParams(block=16)
    with pytest.raises(AttnlabError, match="w_q"):
        attnlab.attention(q, k, k, method="seer", causal=True, w_q=torch.randn(2, 16, 8))
    with pytest.raises(AttnlabError, match="w_k"):
        estimate(q, k, p, causal=True, scale=0.25, w_k=torch.randn(2, 48, 8))  # the unviewed (H_kv, 3 D, G)
    with pytest.raises(AttnlabError, match="D_gate"):
        estimate(q, k, p, causal=True, scale=0.25, w_q=torch.randn(4, 16, 8), w_k=torch.randn(2, 3, 16, 4))
    with pytest.raises(AttnlabError, match="w_k is absent"):
        estimate(q, k, p, causal=True, scale=0.25, w_q=torch.randn(4, 16, 8))


P0, P1 = SPEC.test_params
CASES = [
    Case(2, 4, 2, 45, 45, 16, torch.float32, True, P0),
    Case(1, 2, 1, 40, 40, 16, torch.float32, True, P1, optional_inputs=True),
    Case(1, 2, 2, 20, 45, 16, torch.float32, True, P0, optional_inputs=True),
    Case(1, 4, 2, 33, 50, 16, torch.float32, False, P0, optional_inputs=True),
    Case(1, 2, 2, 40, 40, 16, torch.bfloat16, True, P1, optional_inputs=True),
]


@pytest.mark.parametrize("backend", ["block_sparse", "eager"])
@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_backends_match_reference(backend: str, case: Case) -> None:
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
