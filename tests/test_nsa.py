"""nsa: the selection on planted structure (token and block granularity, shared by a GQA group, forced
blocks), the branches against independent definitions (the window branch is sliding_window, the selected
branch with every block kept is causal softmax, compressed-branch rows with no complete block are zero),
the gates, the reference against fla-org's naive NSA rewritten as loops (token granularity), bad input, and the
fast path against the reference (forward, backward, gates, bf16, cross)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.nsa import SPEC, NsaParams, compress, estimate_selection, reference, scan
from attnlab.errors import AttnlabError, ParamError
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

N, BS, FAR = 128, 16, 2  # 8 key blocks of 16; the planted block is block 2 (keys 32..47)


def planted(heads: int = 1, kv_heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, heads, N, 32): key block FAR holds one direction u; the last query block looks for u,
    the other rows are random and small."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    k = 0.1 * torch.randn(1, kv_heads, N, 32, generator=g)
    k[:, :, FAR * BS : (FAR + 1) * BS] += 4 * u
    q = 0.1 * torch.randn(1, heads, N, 32, generator=g)
    q[:, :, N - BS :] += 4 * u
    return q, k


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_planted_block_is_selected(granularity: str) -> None:
    q, k = planted()
    p = NsaParams(block=BS, topn=2, granularity=granularity)
    _, sel = scan(q, k, None, p, scale=32**-0.5)
    last = sel[0, 0, -1]  # the last query block (block) / the last row (token)
    assert last.nonzero().flatten().tolist() == [FAR, N // BS - 1]  # the planted block and the local one
    plan = estimate_selection(q, k, p, causal=True, scale=32**-0.5)
    assert bool(plan.dense_mask()[0, 0, -1, FAR * BS : (FAR + 1) * BS].all())
    assert not bool(plan.dense_mask()[0, 0, -1, (FAR + 1) * BS : N - BS].any())


def test_selection_is_shared_by_a_gqa_group_and_summed_over_it() -> None:
    q, k = planted(heads=4, kv_heads=2)
    q[:, 1, N - BS :] = 0.0  # head 1 no longer looks for u: its group still picks FAR through head 0
    q[:, 2:, N - BS :] = 0.1  # heads 2, 3 (kv head 1): no planted query
    p = NsaParams(block=BS, topn=2)
    plan = estimate_selection(q, k, p, causal=True, scale=32**-0.5)
    tiles = plan.full | plan.partial  # (1, 4, NQB, NKB)
    assert torch.equal(tiles[0, 0], tiles[0, 1]) and torch.equal(tiles[0, 2], tiles[0, 3])
    assert bool(tiles[0, 1, -1, FAR])


def test_forced_blocks_and_budget() -> None:
    q, k = planted()
    p = NsaParams(block=BS, topn=3, local=2, sink=True)
    _, sel = scan(q, k, None, p, scale=32**-0.5)
    assert sel[0, 0, -1].nonzero().flatten().tolist() == [0, N // BS - 2, N // BS - 1]  # sink and 2 local
    counts = sel.sum(-1)[0, 0]
    visible = torch.arange(N // BS) + 1
    assert torch.equal(counts, torch.clamp(visible, max=3))  # topn, or every visible block when fewer


@pytest.mark.parametrize(("local", "sink"), [(1, False), (2, True)])
def test_chunked_prefill_query_blocks_force_every_rows_own_block(local: int, sink: bool) -> None:
    # N_k - N_q = 24: query block i (positions 24 + 16 i .. 39 + 16 i) straddles key blocks i + 1, i + 2;
    # the forced set is the union of its rows' (the local blocks before each row's own), topn counts its
    # last row's, the one more comes on top (topn + 1 blocks, topn - local - sink by importance)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 64, 32, generator=g), torch.randn(1, 1, 88, 32, generator=g)
    topn = local + int(sink) + 1
    p = NsaParams(block=BS, topn=topn, window=0, local=local, sink=sink)
    _, sel = scan(q, k, None, p, scale=32**-0.5)
    for i in range(4):
        kept = set(sel[0, 0, i].nonzero().flatten().tolist())
        forced = set(range(max(0, i + 2 - local), i + 3)) | ({0} if sink else set())
        assert forced <= kept and max(kept) == i + 2, (i, kept)
        assert len(kept) == min(topn + 1, i + 3), (i, kept)
    mask = estimate_selection(q, k, p, causal=True, scale=32**-0.5).dense_mask()
    assert bool(mask[..., torch.arange(64), torch.arange(64) + 24].all())  # every row's own position
    # the token granularity's rows are unchanged: their own block is forced as before
    tok = NsaParams(block=BS, topn=topn, window=0, local=local, sink=sink, granularity="token")
    _, rows = scan(q, k, None, tok, scale=32**-0.5)
    assert torch.equal(rows.sum(-1)[0, 0], torch.clamp((torch.arange(64) + 24) // BS + 1, max=topn))


def test_branches_against_independent_definitions() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    p = NsaParams(block=BS, topn=3, window=7)  # 3 blocks cover all 40 keys: the selection is everything
    slc = reference(q, k, v, p, g_cmp=zero, g_slc=one, g_swa=zero, causal=True, scale=0.25)
    dense = attnlab.attention(q, k, v, method="softmax", causal=True, scale=0.25, backend="reference")
    torch.testing.assert_close(slc, dense)
    swa = reference(q, k, v, p, g_cmp=zero, g_slc=zero, g_swa=one, causal=True, scale=0.25)
    window = attnlab.attention(q, k, v, method="sliding_window", window=7, causal=True, scale=0.25,
                               backend="reference")  # fmt: skip
    torch.testing.assert_close(swa, window)
    cmp = reference(q, k, v, p, g_cmp=one, g_slc=zero, g_swa=zero, causal=True, scale=0.25)
    assert bool((cmp[:, :, : BS - 1] == 0).all())  # no complete block yet
    # row 31 sees blocks 0 and 1: softmax over the two block means
    kc, vc = compress(k, BS), compress(v, BS)
    w = torch.softmax(q[:, :, 31:32] @ kc[:, :, :2].transpose(-1, -2) * 0.25, dim=-1)
    torch.testing.assert_close(cmp[:, :, 31:32], w @ vc[:, :, :2])
    both = reference(q, k, v, p, causal=True, scale=0.25)  # default gates: the mean of the three branches
    torch.testing.assert_close(both, (cmp + slc + swa) / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 48}, "block=48"),
        ({"topn": 1, "local": 2}, "topn=1"),
        ({"topn": 1, "sink": True}, "topn=1"),
        ({"local": 0}, "local"),
        ({"window": -1}, "window"),
        ({"granularity": "row"}, "granularity"),
    ],
)
def test_bad_parameters_get_clear_errors(kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="nsa", causal=True, **kwargs)


def test_non_causal_and_bad_gates_are_refused() -> None:
    q = torch.randn(1, 2, 32, 16, device=DEVICE)  # (on a GPU machine the CPU has no backend to refuse with)
    with pytest.raises(AttnlabError, match="causal"):
        attnlab.attention(q, q, q, method="nsa", causal=False)
    with pytest.raises(AttnlabError, match="g_slc"):
        attnlab.attention(q, q, q, method="nsa", causal=True, g_slc=torch.rand(1, 2, 31, device=DEVICE))


P0, P1 = SPEC.test_params
CASES = [
    Case(2, 4, 2, 45, 45, 16, torch.float32, True, P0),
    Case(1, 2, 1, 40, 40, 16, torch.float32, True, P1, optional_inputs=True),
    Case(1, 2, 2, 20, 45, 16, torch.float32, True, P0, optional_inputs=True),
    Case(1, 2, 2, 40, 40, 16, torch.bfloat16, True, P1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_fast_path_matches_reference(case: Case) -> None:
    check = check_parity(SPEC, "block_sparse", case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran


def fla_naive(q, k, v, g_cmp, g_slc, g_swa, bs: int, topn: int, window: int, scale: float):  # type: ignore[no-untyped-def]
    """fla-org's naive NSA (``naive_nsa_with_compression``) rewritten as plain loops over (b, h, t):
    mean-pooled complete blocks, the current block's importance 1 per head summed over the group, top-n
    blocks per token, the window ``t - w + 1 .. t``, outputs times gates."""
    b_, h_, n, d = q.shape
    hk = k.shape[1]
    grp = h_ // hk
    nc = n // bs
    kc = torch.stack([k[:, :, c * bs : (c + 1) * bs].mean(2) for c in range(nc)], 2) if nc else None
    vc = torch.stack([v[:, :, c * bs : (c + 1) * bs].mean(2) for c in range(nc)], 2) if nc else None
    out = torch.zeros_like(q)
    for b in range(b_):
        for t in range(n):
            vis = [c for c in range(nc) if (c + 1) * bs - 1 <= t]
            for kv in range(hk):
                probs, imp = {}, torch.zeros(t // bs + 1)
                for h in range(kv * grp, (kv + 1) * grp):
                    if vis:
                        assert kc is not None
                        p = torch.softmax(torch.stack([q[b, h, t] @ kc[b, kv, c] * scale for c in vis]), 0)
                        probs[h] = p
                        for i, c in enumerate(vis):
                            if c < t // bs:
                                imp[c] += p[i]
                    imp[t // bs] += 1.0
                chosen = torch.argsort(imp, descending=True)[:topn].tolist()
                keys = [j for c in chosen for j in range(c * bs, min((c + 1) * bs, n)) if j <= t]
                win = list(range(max(0, t - window + 1), t + 1))
                for h in range(kv * grp, (kv + 1) * grp):
                    o_cmp = torch.zeros(d)
                    if vis:
                        assert vc is not None
                        o_cmp = torch.stack([probs[h][i] * vc[b, kv, c] for i, c in enumerate(vis)]).sum(0)
                    ws = torch.softmax(torch.stack([q[b, h, t] @ k[b, kv, j] * scale for j in keys]), 0)
                    o_slc = sum(w * v[b, kv, j] for w, j in zip(ws, keys, strict=True))
                    ww = torch.softmax(torch.stack([q[b, h, t] @ k[b, kv, j] * scale for j in win]), 0)
                    o_swa = sum(w * v[b, kv, j] for w, j in zip(ww, win, strict=True))
                    out[b, h, t] = g_cmp[b, h, t] * o_cmp + g_slc[b, h, t] * o_slc + g_swa[b, h, t] * o_swa
    return out


def test_token_granularity_matches_fla_naive_loops() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 70, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64) for _ in range(2))
    gates = [torch.rand(1, 4, 70, generator=g, dtype=torch.float64) for _ in range(3)]
    p = NsaParams(block=16, topn=2, window=9, granularity="token")
    ours = reference(q, k, v, p, causal=True, scale=0.3, g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2])
    theirs = fla_naive(q, k, v, gates[0], gates[1], gates[2], bs=16, topn=2, window=9, scale=0.3)
    torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)
