"""Varlen on the block-sparse executor: packed sequences (cu_seqlens) against each sequence run alone
through the naive path, forward (out, lse) and backward (dq, dk, dv); dense and per-sequence plans
(random per-head tiles with the causal rule, a static sliding-window plan with its own token rule);
odd lengths, a length-1 sequence, sequences shorter than a block, an empty one, cross-attention with rows
that see no key; the packed plan's mask and tables; bad cu_seqlens and plans.

On a CPU the kernels run in Triton's interpreter (tiles of 16)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attnlab
from attnlab.backends.varlen import block_sparse_varlen
from attnlab.kernels.block_sparse.naive import block_sparse_naive, tables_mask
from attnlab.plans import Plan, static_plan
from attnlab.plans.executor import executor_tables, varlen_plan
from attnlab.testing import device_under_test

DEVICE = device_under_test()
BS = 16
SELF = [5, 1, 31, 13, 0, 20]  # odd, length 1, shorter than a block, an empty sequence
CROSS_Q = [5, 1, 31, 13]
CROSS_K = [9, 2, 20, 30]  # sequence 2: 31 queries over 20 keys, its first 11 rows see no key when causal


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def dense_mask(n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    m = torch.ones(1, 1, n_q, n_k, dtype=torch.bool)
    if causal:
        m &= torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    return m


def random_plan(n_q: int, n_k: int, causal: bool, heads: int, seed: int) -> Plan:
    """Per-head random tiles (about half), the causal diagonal tiles partial with the causal rule."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-n_q // BS), -(-n_k // BS)
    off = n_k - n_q
    q_first = torch.arange(nqb) * BS + off
    q_last = torch.clamp((torch.arange(nqb) + 1) * BS, max=n_q) - 1 + off
    k_first = torch.arange(nkb) * BS
    k_last = torch.clamp(k_first + BS, max=n_k) - 1
    tiles = torch.rand(1, heads, nqb, nkb, generator=g) < 0.5
    if not causal:
        return Plan(n_q, n_k, False, BS, BS, tiles, torch.zeros_like(tiles), None, kind="dynamic")
    tiles &= k_first[None, :] <= q_last[:, None]
    whole = k_last[None, :] <= q_first[:, None]

    def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return kv_idx <= q_idx + off

    return Plan(
        n_q, n_k, True, BS, BS, tiles & whole, tiles & ~whole, mask_mod, kind="dynamic", rule="causal"
    )


def window_plan(n_q: int, n_k: int, causal: bool, device: torch.device) -> Plan:
    spec = attnlab.get("sliding_window")
    return static_plan(spec, spec.make_params({"window": 7}), n_q, n_k, causal, device, BS)


PlanFn = Callable[[torch.Tensor, torch.Tensor, bool], Plan] | None


def per_sequence(q, k, v, lq, lk, causal, plan_fn: PlanFn, scale):  # type: ignore[no-untyped-def]
    """(out, lse) of each sequence run alone through the naive path (fp32), packed back together."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"))
    outs, lses = [], []
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for s in range(len(lq)):
        qs, ks, vs = q[:, :, cq[s] : cq[s + 1]], k[:, :, ck[s] : ck[s + 1]], v[:, :, ck[s] : ck[s + 1]]
        if lq[s] == 0 or lk[s] == 0:
            outs.append(torch.zeros(qs.shape, dtype=torch.float32))
            lses.append(torch.full(qs.shape[:3], float("-inf")))
            continue
        mask = dense_mask(lq[s], lk[s], causal) if plan_fn is None else plan_fn(qs, ks, causal).dense_mask()
        o, s_lse = block_sparse_naive(qs, ks, vs, mask, scale)
        outs.append(o)
        lses.append(s_lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return out, lse


def random_qkv(tq: int, tk: int, seed: int, dtype=torch.float32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, tq, 16, generator=g).to(dtype)
    k = torch.randn(1, 2, tk, 16, generator=g).to(dtype)
    v = torch.randn(1, 2, tk, 16, generator=g).to(dtype)
    return q, k, v


PLAN_FNS: dict[str, PlanFn] = {
    "dense": None,
    "random": lambda q, k, causal: random_plan(
        q.shape[2], k.shape[2], causal, 4, seed=q.shape[2] * 7 + k.shape[2]
    ),
    "window": lambda q, k, causal: window_plan(q.shape[2], k.shape[2], causal, q.device),
}


LONG_Q = [40, 100, 37, 64, 3]  # sequences over several tiles: interior tiles share pattern ids
LONG_K = [40, 90, 50, 64, 9]


@pytest.mark.parametrize("plan", ["dense", "random", "window"])
@pytest.mark.parametrize("shape", ["self", "cross", "long", "long_cross"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_plan_is_block_diagonal(plan: str, shape: str, causal: bool) -> None:
    lq, lk = {"self": (SELF, SELF), "cross": (CROSS_Q, CROSS_K), "long": (LONG_Q, LONG_Q),
              "long_cross": (LONG_Q, LONG_K)}[shape]  # fmt: skip
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    q, k, _ = random_qkv(cq[-1], ck[-1], 0)
    fn = PLAN_FNS[plan]
    plans = [
        None if fn is None or lq[s] == 0 or lk[s] == 0
        else fn(q[:, :, cq[s] : cq[s + 1]], k[:, :, ck[s] : ck[s + 1]], causal)
        for s in range(len(lq))
    ]  # fmt: skip
    packed = varlen_plan(cq, ck, plans, causal, BS, "cpu")
    want = torch.zeros(1, packed.full.shape[1], cq[-1], ck[-1], dtype=torch.bool)
    for s, p in enumerate(plans):
        if lq[s] and lk[s]:
            m = dense_mask(lq[s], lk[s], causal) if p is None else p.dense_mask()
            want[:, :, cq[s] : cq[s + 1], ck[s] : ck[s + 1]] = m[0]
    assert torch.equal(packed.dense_mask(), want)
    t = executor_tables(packed)
    got = tables_mask(t.p_num, t.p_idx, t.p_pat, t.f_num, t.f_idx, t.c_num, t.c_idx, t.patterns,
                      packed.n_q, packed.n_k, False)  # fmt: skip
    assert torch.equal(got, want)
    if shape.startswith("long"):  # tiles with equal ids were evaluated once: fewer patterns than tiles
        assert packed.pattern_ids is not None and t.patterns.shape[0] < int(packed.partial.sum())
    if plan == "dense" and causal and shape == "self":  # tiles inside one sequence, below its diagonal,
        # run without a mask even when the sequence does not start on a tile boundary
        longer = varlen_plan([0, 40, 140], [0, 40, 140], [None, None], True, BS, "cpu")
        assert bool(longer.full[0, 0, 6, 3]) and bool(longer.full.any())
        want = torch.zeros(140, 140, dtype=torch.bool)
        want[:40, :40] = dense_mask(40, 40, True)[0, 0]
        want[40:, 40:] = dense_mask(100, 100, True)[0, 0]
        assert torch.equal(longer.dense_mask()[0, 0], want)


@pytest.mark.parametrize(
    ("plan", "shape", "causal"),
    [("dense", "self", True), ("dense", "cross", True), ("random", "self", True), ("window", "cross", False),
     ("random", "cross", False)],
)  # fmt: skip
def test_varlen_matches_sequences_run_alone(plan: str, shape: str, causal: bool) -> None:
    lq, lk = (SELF, SELF) if shape == "self" else (CROSS_Q, CROSS_K)
    q, k, v = random_qkv(sum(lq), sum(lk), 1)
    leaves = [t.clone().to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    out, lse = block_sparse_varlen(leaves[0], leaves[1], leaves[2], cu(lq).to(DEVICE), cu(lk).to(DEVICE), causal=causal,
                                   plan_fn=PLAN_FNS[plan], scale=0.3, block=BS)  # fmt: skip
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want, want_lse = per_sequence(refs[0], refs[1], refs[2], lq, lk, causal, PLAN_FNS[plan], 0.3)
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)  # rows with no key: -inf on both sides
    torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], atol=2e-5, rtol=1e-5)
    if shape == "cross" and causal:
        assert bool((out[:, :, 6 : 6 + 11] == 0).all())  # sequence 2's first 11 rows see no key
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, leaves, g.to(DEVICE))
    ref = torch.autograd.grad(want, refs, g)
    for name, a, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a.cpu(), r, atol=5e-5, rtol=1e-4, msg=name)


def test_bad_cu_seqlens_and_plans_get_clear_errors() -> None:
    q, k, v = random_qkv(20, 20, 3)
    good = torch.tensor([0, 7, 20], dtype=torch.int32)
    cases = [
        (torch.tensor([0.0, 7.0, 20.0]), TypeError, "int"),
        (torch.tensor([1, 7, 20], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 12, 7, 20], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([0, 7, 19], dtype=torch.int32), ValueError, "20 tokens"),
        (torch.tensor([[0, 7, 20]], dtype=torch.int32), ValueError, "1-D"),
    ]
    for bad, err, match in cases:
        with pytest.raises(err, match=match):
            block_sparse_varlen(q, k, v, bad, good, causal=True, block=BS)
        with pytest.raises(err, match=match):
            block_sparse_varlen(q, k, v, good, bad, causal=True, block=BS)
    with pytest.raises(ValueError, match="same sequences"):
        block_sparse_varlen(q, k, v, good, torch.tensor([0, 20], dtype=torch.int32), causal=True, block=BS)
    with pytest.raises(ValueError, match=r"\(1, H, T_q, D\)"):
        q2 = q.expand(2, -1, -1, -1)
        block_sparse_varlen(q2, k, v, good, good, causal=True, block=BS)
    with pytest.raises(ValueError, match="block=48"):
        block_sparse_varlen(q, k, v, good, good, causal=True, block=48)
    one, none = torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 1, 1, dtype=torch.bool)

    def coarse(a: torch.Tensor, b: torch.Tensor, c: bool) -> Plan:
        return Plan(a.shape[2], b.shape[2], False, 32, 32, one, none, None)

    with pytest.raises(ValueError, match="32 x 32"):
        block_sparse_varlen(q, k, v, good, good, causal=False, block=BS, plan_fn=coarse)

    def with_columns(a: torch.Tensor, b: torch.Tensor, c: bool) -> Plan:
        p = random_plan(a.shape[2], b.shape[2], False, 1, 0)
        cols = torch.zeros(1, 1, p.full.shape[2], 1, dtype=torch.int32)
        return Plan(p.n_q, p.n_k, False, BS, BS, p.full, p.partial, None, columns=cols)

    with pytest.raises(ValueError, match="columns"):
        block_sparse_varlen(q, k, v, good, good, causal=False, block=BS, plan_fn=with_columns)


def test_random_packings_tables_match_the_block_diagonal_mask() -> None:
    """Random packings (empty, length-1, sub-block and multi-block sequences; self and cross; every plan
    kind): the tables the executor reads (tiles sharing a pattern id evaluated once) encode exactly the
    block-diagonal mask."""
    g = torch.Generator().manual_seed(5)
    sizes = [0, 1, 2, 5, 15, 16, 17, 31, 33, 40, 64, 70]
    for trial in range(20):
        n_seq = int(torch.randint(1, 6, (1,), generator=g))
        lq = [sizes[int(x)] for x in torch.randint(0, len(sizes), (n_seq,), generator=g)]
        lk = lq if trial % 2 else [sizes[int(x)] for x in torch.randint(0, len(sizes), (n_seq,), generator=g)]
        if sum(lq) == 0 or sum(lk) == 0:
            continue
        causal = trial % 4 < 2
        fn = list(PLAN_FNS.values())[trial % 3]
        cq, ck = cu(lq).tolist(), cu(lk).tolist()
        q, k, _ = random_qkv(cq[-1], ck[-1], trial)
        plans = [
            None if fn is None or lq[s] == 0 or lk[s] == 0
            else fn(q[:, :, cq[s] : cq[s + 1]], k[:, :, ck[s] : ck[s + 1]], causal)
            for s in range(n_seq)
        ]  # fmt: skip
        packed = varlen_plan(cq, ck, plans, causal, BS, "cpu")
        want = torch.zeros(1, packed.full.shape[1], cq[-1], ck[-1], dtype=torch.bool)
        for s, p in enumerate(plans):
            if lq[s] and lk[s]:
                m = dense_mask(lq[s], lk[s], causal) if p is None else p.dense_mask()
                want[:, :, cq[s] : cq[s + 1], ck[s] : ck[s + 1]] = m[0]
        t = executor_tables(packed)
        got = tables_mask(t.p_num, t.p_idx, t.p_pat, t.f_num, t.f_idx, t.c_num, t.c_idx, t.patterns,
                          packed.n_q, packed.n_k, False)  # fmt: skip
        assert torch.equal(got, want), (lq, lk, causal, trial)
