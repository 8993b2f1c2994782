"""Review of the block-sparse executor: the lse's gradient, tables of other lengths, tiles both full and
partial, a Plan's shapes, vertical_slash's empty rows, seer's plan kept in the call's memo.

On a CPU the kernels run in Triton's interpreter on tiny shapes (16 x 16 tiles).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.kernels.block_sparse.naive import block_sparse_naive
from attnlab.plans import Plan
from attnlab.plans.executor import executor_tables
from attnlab.testing import device_under_test

DEVICE = device_under_test()


def _plan(n_q: int, n_k: int, causal: bool, block: int, columns: int, seed: int, hp: int = 1) -> Plan:
    """Random full tiles, the causal diagonal tiles partial, random token columns (-1 padded)."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-n_q // block), -(-n_k // block)
    full = torch.rand(1, hp, nqb, nkb, generator=g) < 0.5
    full[..., 0] = True  # every row keeps a key
    off = n_k - n_q
    partial = torch.zeros_like(full)
    mask_mod = None
    if causal:
        q_first = torch.arange(nqb) * block + off
        q_last = torch.clamp((torch.arange(nqb) + 1) * block, max=n_q) - 1 + off
        k_first = torch.arange(nkb) * block
        k_last = torch.clamp(k_first + block, max=n_k) - 1
        allowed = k_first[None, :] <= q_last[:, None]
        whole = k_last[None, :] <= q_first[:, None]
        partial = (full & allowed & ~whole) | (allowed & ~whole & (k_first[None, :] <= q_first[:, None]))
        full = full & whole

        def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
            return kv_idx <= q_idx + off

    cols = None
    if columns:
        cols = torch.randint(-1, n_k, (1, hp, nqb, columns), generator=g, dtype=torch.int32).to(DEVICE)
    full, partial = full.to(DEVICE), partial.to(DEVICE)  # (the plan lives on q's device)
    return Plan(n_q, n_k, causal, block, block, full, partial, mask_mod, kind="dynamic", columns=cols)


def _weights(out: Tensor, lse: Tensor, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(out.shape, generator=g).to(out.device),
        torch.randn(lse.shape, generator=g).to(lse.device),
    )


def _objective(out: Tensor, lse: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """(out * w).sum() + (lse * u).sum() over the rows with a finite lse."""
    fin = torch.isfinite(lse)
    return (out.float() * w).sum() + (torch.where(fin, lse, 0.0) * u).sum()


def _leaves(*ts: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _close(got: Any, want: Any, what: str, tol: float = 1e-4) -> None:
    for name, a, b in zip("qkv", got, want, strict=True):
        assert not a.isnan().any(), f"{what}: NaN in d{name}"
        torch.testing.assert_close(
            a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{what} d{name}: {m}"
        )


# 1. the lse's gradient -----------------------------------------------------------------------------------

LSE_CASES = [
    ("block_topk", {"block": 16, "topk": 2}, True, 2),
    ("block_topk", {"block": 16, "topk": 2}, False, 4),
    ("sliding_window", {"window": 8}, True, 2),  # a static plan
    ("sliding_window", {"window": 8}, False, 4),
    ("vertical_slash", {"vertical": 3, "slash": 2, "last_q": 8, "block": 16, "sink_columns": 1,
                        "local_diagonals": 1}, True, 2),  # token columns
    ("vertical_slash", {"vertical": 4, "slash": 2, "last_q": 8, "block": 16, "sink_columns": 1,
                        "local_diagonals": 1}, True, 4),
]  # fmt: skip


@pytest.mark.parametrize(("method", "params", "causal", "h_kv"), LSE_CASES)
def test_the_lse_gradient_matches_the_reference(method: str, params: dict, causal: bool, h_kv: int) -> None:
    """The gradient through the returned lse (d lse_i / d s_ij = P_ij) reaches q and k: (out * w).sum() +
    (lse * u).sum() against the reference backend, causal and not, GQA (4 query heads on 2 kv heads) or
    not, with token columns (vertical_slash) and without."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 40, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, h_kv, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    grads = []
    for backend in ("block_sparse", "reference"):
        leaves = _leaves(q, k, v)
        r = attnlab.attention(
            *leaves, method=method, causal=causal, backend=backend, return_lse=True, **params
        )
        assert isinstance(r, attnlab.Result) and r.lse is not None
        w, u = _weights(r.out, r.lse)
        grads.append(torch.autograd.grad(_objective(r.out, r.lse, w, u), leaves))
    _close(grads[0], grads[1], f"{method} causal={causal} h_kv={h_kv}")
    # the lse's part alone is not zero (what the executor gave before)
    leaves = _leaves(q, k, v)
    r = attnlab.attention(
        *leaves, method=method, causal=causal, backend="block_sparse", return_lse=True, **params
    )
    assert r.lse is not None
    dq = torch.autograd.grad(torch.where(torch.isfinite(r.lse), r.lse, 0.0).sum(), leaves[0])[0]
    assert dq.norm() > 0.1


@pytest.mark.parametrize(("causal", "columns"), [(True, 3), (False, 3), (True, 0), (False, 0)])
def test_the_lse_gradient_on_every_backward_path(causal: bool, columns: int, monkeypatch: Any) -> None:
    """dlse enters every backward: the two kernels (token columns through the dQ kernel's atomics), the
    one-pass backward (no columns) and the split tiles (SPLIT = 2), against the naive twin's autograd;
    N_q, N_k not multiples of the tile, GQA 2:1, a per-head plan."""
    import triton

    from attnlab.kernels.block_sparse import op

    n_q, n_k = 45, 53
    q = torch.randn(1, 4, n_q, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, n_k, 16, device=DEVICE) for _ in range(2))
    plan = _plan(n_q, n_k, causal, 32, columns, seed=4, hp=4)
    tables = executor_tables(plan).as_args()
    ql, kl, vl = _leaves(q, k, v)
    ref, rlse = block_sparse_naive(ql, kl, vl, plan.dense_mask(), 0.25)
    w, u = _weights(ref, rlse)
    want = torch.autograd.grad(_objective(ref, rlse, w, u), (ql, kl, vl))
    # the autograd op (two kernels; the one-pass backward where there are no columns)
    for fused in (False, True):
        monkeypatch.setattr(op, "FUSED_BWD", fused)
        leaves = _leaves(q, k, v)
        out, lse = op.block_sparse_attention(*leaves, tables, 0.25, causal)
        got = torch.autograd.grad(_objective(out, lse, w, u), leaves)
        _close(got, want, f"autograd fused={fused}")
    # the launcher given dlse, split tiles
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, causal)
    dlse = torch.where(torch.isfinite(lse), u, 0.0)
    split = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT": 2}, num_warps=4, num_stages=2)
    got = op.block_sparse_bwd_launch(w, q, k, v, o, lse, tables, 0.25, causal, dq_config=split,
                                     dkdv_config=split, fused=False, dlse=dlse)  # fmt: skip
    _close(got, want, "split")
    got = op.block_sparse_bwd_launch(w, q, k, v, o, lse, tables, 0.25, causal, fused=True, dlse=dlse)
    _close(got, want, "launcher fused")


def test_the_bwd_op_takes_dlse_and_its_fake_agrees() -> None:
    """The backward custom op's optional dlse, through ``torch.library.opcheck`` (schema and fake)."""
    from attnlab.kernels.block_sparse.op import block_sparse_bwd, block_sparse_fwd_launch

    q = torch.randn(1, 4, 40, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    tables = [t.to(DEVICE) for t in executor_tables(_plan(40, 40, True, 16, 2, seed=2, hp=4)).as_args()]
    o, lse = block_sparse_fwd_launch(q, k, v, tuple(tables), 0.25, True)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    for extra in (dlse, None):
        torch.library.opcheck(
            block_sparse_bwd, (do, q, k, v, o, lse, tables, 0.25, True, extra),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip


# 2. tables of other lengths / causality ------------------------------------------------------------------


def test_tables_refuse_q_k_of_other_lengths_or_causality() -> None:
    """Tables built for N_q = N_k = 40 (3 x 3 tiles of 16) ran silently on q / k of 45 (the same tile
    counts); a plan's causality differed from the call's. Both are refused on the host, naming both."""
    from attnlab.kernels.block_sparse import op

    plan = _plan(40, 40, True, 16, 2, seed=0)
    tables = executor_tables(plan).as_args()
    assert (tables.n_q, tables.n_k, tables.causal) == (40, 40, True)  # type: ignore[attr-defined]
    x40 = torch.randn(1, 2, 40, 16, device=DEVICE)
    x45 = torch.randn(1, 2, 45, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"built for N_q = 40, N_k = 40.*N_q = 45, N_k = 45"):
        op.block_sparse_attention(x45, x45, x45, tables, 0.25, True)
    with pytest.raises(ValueError, match=r"built for N_q = 40, N_k = 40.*N_q = 40, N_k = 45"):
        op.block_sparse_attention(x40, x45, x45, tables, 0.25, True)
    with pytest.raises(ValueError, match=r"causal=True.*causal=False"):
        op.block_sparse_attention(x40, x40, x40, tables, 0.25, False)
    with pytest.raises(ValueError, match="built for N_q = 40"):
        op.block_sparse_fwd_launch(x45, x45, x45, tables, 0.25, True)
    with pytest.raises(ValueError, match="built for N_q = 40"):
        op.block_sparse_bwd_launch(x45, x45, x45, x45, x45, x45[..., 0], tables, 0.25, True)
    out, _ = op.block_sparse_attention(x40, x40, x40, tables, 0.25, True)  # the lengths it was built for
    ref, _ = block_sparse_naive(x40, x40, x40, plan.dense_mask(), 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# 3. a tile both full and partial ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n_k", "causal"), [(40, False), (40, True), (45, True), (45, False)])
def test_a_tile_both_full_and_partial_is_visited_once(n_k: int, causal: bool) -> None:
    """Plan.dense_mask reads full | partial (full wins); the executor visited such a tile twice (its keys
    counted twice in the softmax). With and without a key tail (N_k not a multiple of the tile: a full
    tail tile is moved to the partial list, with every in-matrix pair)."""
    from attnlab.kernels.block_sparse import op

    n_q = 40
    nqb, nkb = 3, -(-n_k // 16)
    g = torch.Generator().manual_seed(5)
    full = torch.rand(1, 2, nqb, nkb, generator=g) < 0.6
    partial = torch.rand(1, 2, nqb, nkb, generator=g) < 0.6
    full[..., -1] = partial[..., -1] = True  # overlap, the key tail included
    full, partial = full.to(DEVICE), partial.to(DEVICE)  # (the plan lives on q's device)
    off = n_k - n_q

    def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return kv_idx <= q_idx + off if causal else (q_idx + kv_idx) % 3 != 0

    plan = Plan(n_q, n_k, causal, 16, 16, full, partial, mask_mod, kind="dynamic")
    t = executor_tables(plan)
    visits = t.p_num.sum() + t.f_num.sum()
    assert int(visits) == int((full | partial).sum())
    q = torch.randn(1, 2, n_q, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, n_k, 16, device=DEVICE) for _ in range(2))
    ql, kl, vl = _leaves(q, k, v)
    ref, rlse = block_sparse_naive(ql, kl, vl, plan.dense_mask(), 0.25)
    leaves = _leaves(q, k, v)
    out, lse = op.block_sparse_attention(*leaves, t.as_args(), 0.25, causal)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    do = torch.randn_like(ref)
    _close(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, (ql, kl, vl), do), "overlap")


# 4. a Plan's shapes ------------------------------------------------------------------------------------------


def test_a_plan_with_inconsistent_shapes_is_refused_clearly() -> None:
    ones = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    Plan(40, 40, False, 16, 16, ones, ones.clone(), None)  # consistent
    with pytest.raises(ValueError, match=r"full \(2, 2, 3, 3\) and partial \(1, 1, 3, 3\)"):
        Plan(40, 40, False, 16, 16, torch.ones(2, 2, 3, 3, dtype=torch.bool), ones, None)
    with pytest.raises(ValueError, match=r"\(3, 3\) tiles.*N_q = 40, N_k = 50.*need \(3, 4\)"):
        Plan(40, 50, False, 16, 16, ones, ones, None)
    with pytest.raises(ValueError, match=r"\(3, 3\) tiles.*need \(5, 3\)"):
        Plan(40, 40, False, 8, 16, ones, ones, None)
    with pytest.raises(ValueError, match=r"\(Bp, Hp, NQB, NKB\)"):
        Plan(40, 40, False, 16, 16, ones[0], ones[0], None)
    with pytest.raises(ValueError, match=r"columns \(1, 1, 2, 4\).*\(1, 1, 3, C\)"):
        Plan(40, 40, False, 16, 16, ones, ones, None, columns=torch.zeros(1, 1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"columns \(2, 1, 3, 4\).*\(1, 1, 3, C\)"):
        Plan(40, 40, False, 16, 16, ones, ones, None, columns=torch.zeros(2, 1, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer dtype.*torch.float32"):
        Plan(40, 40, False, 16, 16, ones, ones, None, columns=torch.zeros(1, 1, 3, 4))
    Plan(40, 40, False, 16, 16, ones, ones, None, columns=torch.zeros(1, 1, 3, 4, dtype=torch.int64))
    # columns broadcast over the plan's batch / heads (1) or match them
    two = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    Plan(40, 40, False, 16, 16, two, two, None, columns=torch.zeros(1, 4, 3, 2, dtype=torch.int32))


def test_the_plan_check_traces_without_a_graph_break() -> None:
    """The check reads shapes only (no device read): a Plan builds inside a full graph."""

    def build(full: Tensor, partial: Tensor) -> Tensor:
        plan = Plan(40, 40, False, 16, 16, full, partial, None, kind="dynamic")
        return plan.full | plan.partial

    ones = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    got = torch.compile(build, fullgraph=True, backend="eager")(ones, ones)
    assert bool(got.all())


# 5. vertical_slash keeps the diagonal -------------------------------------------------------------------------


@pytest.mark.parametrize("n_q", [96, 70])
def test_vertical_slash_keeps_the_diagonal_without_sinks_or_local_diagonals(n_q: int) -> None:
    """With sink_columns = 0 and local_diagonals = 0 some causal rows had no key (zeros out); the diagonal
    (distance 0) is always kept, so every query that may see a key sees one, in the plan, the reference and
    the executor alike."""
    params = {"vertical": 5, "slash": 2, "last_q": 4, "block": 16, "sink_columns": 0, "local_diagonals": 0}
    spec = attnlab.get("vertical_slash")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 2, n_q, 16, generator=g).to(DEVICE)
        k, v = (torch.randn(1, 2, 96, 16, generator=g).to(DEVICE) for _ in range(2))
        plan = spec.estimate(q, k, spec.make_params(params), causal=True, scale=0.25)  # type: ignore[misc]
        dm = plan.dense_mask()
        assert dm.any(-1).all(), f"seed {seed}: {int((~dm.any(-1)).sum())} rows without a key"
        pos = torch.arange(n_q) + (96 - n_q)
        assert dm[..., torch.arange(n_q), pos].all()  # the diagonal itself
        res = attnlab.attention(q, k, v, method="vertical_slash", causal=True, backend="block_sparse",
                                return_plan=True, **params)  # fmt: skip
        assert isinstance(res, attnlab.Result)
        assert (res.out.abs().sum(-1) > 0).all()
        ref = attnlab.attention(q, k, v, method="vertical_slash", causal=True, backend="reference", **params)
        torch.testing.assert_close(res.out, ref, atol=1e-4, rtol=1e-4)


# 6. seer's plan not kept in the call's memo ----------------------------------------------------------------------


def _memo_plans(op: Any) -> list[str]:
    from attnlab.plans.executor import ExecutorTables

    found = []
    for call, _ in op._entries.values():
        for name, value in call.memo.items():
            if isinstance(value, (Plan, ExecutorTables)) or (isinstance(value, tuple) and any(
                isinstance(x, (Plan, ExecutorTables)) for x in value
            )):  # fmt: skip
                found.append(name)
    return found


@pytest.mark.parametrize("backend", ["block_sparse", "eager"])
def test_seer_keeps_no_plan_in_the_call_memo(backend: str) -> None:
    """A cached call lives as long as its op: a plan (and its tables, on the device) kept in its memo
    outlives the run and is shared by threads calling the same signature. return_plan still gives the plan
    the run executed (with the gate's weights)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 48, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 1, 48, 16, generator=g).to(DEVICE) for _ in range(2))
    w = {
        "w_q": torch.randn(2, 16, 8, generator=g).to(DEVICE),
        "w_k": torch.randn(1, 3, 16, 8, generator=g).to(DEVICE),
    }
    for return_plan in (True, False):
        op = attnlab.prepare("seer", causal=True, backend=backend, return_plan=return_plan,
                             return_lse=backend == "block_sparse", block=16, threshold=0.2)  # fmt: skip
        res = op(q, k, v, **w)
        assert _memo_plans(op) == []
        if return_plan:
            spec = attnlab.get("seer")
            want = spec.estimate(q, k, spec.make_params({"block": 16, "threshold": 0.2}), causal=True,  # type: ignore[misc]
                                 scale=16**-0.5, **w)  # fmt: skip
            assert isinstance(res, attnlab.Result) and isinstance(res.plan, Plan)
            assert torch.equal(res.plan.dense_mask(), want.dense_mask())
            plain = spec.estimate(q, k, spec.make_params({"block": 16, "threshold": 0.2}), causal=True,  # type: ignore[misc]
                                  scale=16**-0.5)  # fmt: skip
            assert not torch.equal(plain.dense_mask(), want.dense_mask())  # the weights made a difference
