"""The block-sparse executor: its tables against the plan, its kernels against the naive twin, bad input.

On a CPU the kernels run in Triton's interpreter on tiny shapes (32 x 32 plan tiles, 16 x 16 kernel
tiles); the CUDA tests run the default tiles and autotuned schedules at the sizes the benchmark times.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.kernels.block_sparse.naive import block_sparse_naive, tables_mask
from attnlab.masks import MaskContext
from attnlab.plans import Plan
from attnlab.plans.executor import executor_tables
from attnlab.plans.static import plan_from_mask
from attnlab.testing import device_under_test, on_cuda

DEVICE = device_under_test()


def _mask_of(plan: Plan) -> torch.Tensor:
    t = executor_tables(plan)
    return tables_mask(
        t.p_num, t.p_idx, t.p_pat, t.f_num, t.f_idx, t.c_num, t.c_idx, t.patterns, plan.n_q, plan.n_k,
        plan.causal,
    )  # fmt: skip


def random_plan(
    bp: int, hp: int, n_q: int, n_k: int, causal: bool, block: int, density: float, columns: int, seed: int
) -> Plan:
    """A dynamic-style plan: random full tiles, the causal diagonal tiles partial, random token columns
    (some inside visited tiles, some repeated, some -1), every query block keeping its last allowed tile."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-n_q // block), -(-n_k // block)
    full = torch.rand(bp, hp, nqb, nkb, generator=g) < density
    offset = n_k - n_q
    q_last = torch.minimum((torch.arange(nqb) + 1) * block, torch.tensor(n_q)) - 1 + offset  # last position
    q_first = torch.arange(nqb) * block + offset
    k_first = torch.arange(nkb) * block
    k_last = torch.minimum(k_first + block, torch.tensor(n_k)) - 1
    partial = torch.zeros_like(full)
    if causal:
        allowed = k_first[None, :] <= q_last[:, None]  # some pair of the tile is causal
        whole = k_last[None, :] <= q_first[:, None]  # every pair is
        partial = (allowed & ~whole).expand_as(full).clone()
        full &= whole
    mask_mod = None
    if causal:

        def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
            return kv_idx <= q_idx + offset

    cols = None
    if columns:
        cols = torch.randint(-1, n_k, (bp, hp, nqb, columns), generator=g, dtype=torch.int32)
        cols[..., -1] = cols[..., 0]  # a repeat
    return Plan(n_q, n_k, causal, block, block, full, partial, mask_mod, kind="dynamic", columns=cols)


@pytest.mark.parametrize("method", ["sliding_window", "streaming", "dilated", "block_local"])
def test_tables_encode_the_static_plan(method: str) -> None:
    spec = attnlab.get(method)
    params = spec.make_params(dict(spec.test_params[1] if len(spec.test_params) > 1 else {}))
    for n_q, n_k, causal in ((70, 70, True), (70, 70, False), (30, 90, True), (90, 30, False)):
        mm = spec.mask(params, MaskContext(n_q, n_k, causal, "cpu"))
        plan = plan_from_mask(mm, n_q, n_k, causal, "cpu", 32, 32)
        assert torch.equal(_mask_of(plan), plan.dense_mask()), (method, n_q, n_k, causal)
        # identical tiles share a pattern: far fewer patterns than partial tiles
        t = executor_tables(plan)
        assert t.patterns.shape[0] <= max(1, int(plan.partial.sum()))


def test_tables_of_a_dynamic_plan_with_columns() -> None:
    for causal in (True, False):
        plan = random_plan(2, 3, 50, 77, causal, 16, 0.3, 9, seed=1)
        mask = _mask_of(plan)
        assert torch.equal(mask, plan.dense_mask())
        t = executor_tables(plan)
        # columns never fall inside a visited tile of their block, are ascending and unique
        for b in range(2):
            for h in range(3):
                for r in range(t.c_num.shape[2]):
                    cols = t.c_idx[b, h, r, : int(t.c_num[b, h, r])].tolist()
                    assert cols == sorted(set(cols))
                    visited = (plan.full | plan.partial)[b, h, r]
                    assert not any(bool(visited[c // 16]) for c in cols)


@pytest.mark.parametrize("cols", [[0, -1], [5, 0, -1], [-1, 0], [-1, -1]])
def test_dense_mask_keeps_a_key_0_column_before_padding(cols: list[int]) -> None:
    """-1 pads in a column list do not hide a real column 0 (the dense mask is the reference's mask)."""
    full = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    full[0, 0, 1, 1] = True
    columns = torch.tensor([cols, cols], dtype=torch.int32).view(1, 1, 2, len(cols))
    plan = Plan(64, 64, False, 32, 32, full, torch.zeros_like(full), None, kind="dynamic", columns=columns)
    mask = plan.dense_mask()
    assert torch.equal(mask, _mask_of(plan))
    assert bool(mask[0, 0, 0, 0]) == (0 in cols)  # query block 0 visits no tile: key 0 only as a column


def test_column_tables_say_from_their_shape_whether_the_plan_has_columns() -> None:
    """No columns: 1-wide column tables; one column per row (or more): at least 2 wide, -1 padded, so the
    executor decides from shapes (no device read) and still runs the single column, forward and backward."""
    from attnlab.kernels import block_sparse
    from attnlab.plans.executor import COLUMNS_MIN_WIDTH

    assert block_sparse.COLUMNS_MIN_WIDTH == COLUMNS_MIN_WIDTH  # the builder's and the launchers' copies
    none = executor_tables(random_plan(1, 2, 40, 40, True, 16, 0.3, 0, seed=2))
    assert none.c_idx.shape[-1] == 1 and not none.has_columns
    plan = random_plan(1, 2, 40, 40, True, 16, 0.3, 0, seed=2)
    cols = torch.full((1, 2, 3, 1), 0, dtype=torch.int32)  # key 0 for every row (outside most visited tiles)
    one = Plan(40, 40, True, 16, 16, plan.full, plan.partial, plan.mask_mod, kind="dynamic", columns=cols)
    t = executor_tables(one)
    assert t.has_columns and t.c_idx.shape[-1] == COLUMNS_MIN_WIDTH
    assert (t.c_idx[..., 1] == -1).all()
    q = torch.randn(1, 2, 40, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    _run_and_compare(q, k, v, one, True, grads=True, tol=1e-4)


def test_causal_rule_tables_equal_the_evaluated_ones() -> None:
    for n_q, n_k in ((50, 77), (77, 50), (64, 64)):
        plan = random_plan(2, 3, n_q, n_k, True, 16, 0.3, 0, seed=n_q)
        fast = Plan(plan.n_q, plan.n_k, True, 16, 16, plan.full, plan.partial, plan.mask_mod, kind="dynamic",
                    rule="causal")  # fmt: skip
        assert torch.equal(_mask_of(fast), plan.dense_mask())


def test_a_full_tile_past_the_key_tail_becomes_partial() -> None:
    full = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    plan = Plan(40, 40, False, 32, 32, full, torch.zeros_like(full), None, kind="dynamic")
    t = executor_tables(plan)
    assert t.f_num.tolist() == [[[1, 1]]] and t.p_num.tolist() == [[[1, 1]]]
    assert torch.equal(_mask_of(plan), torch.ones(1, 1, 40, 40, dtype=torch.bool))


def _run_and_compare(q, k, v, plan: Plan, causal: bool, grads: bool, tol: float) -> None:  # type: ignore[no-untyped-def]
    from attnlab.kernels.block_sparse.op import block_sparse_attention

    tables = tuple(t.to(q.device) for t in executor_tables(plan).as_args())
    mask = plan.dense_mask()
    scale = q.shape[-1] ** -0.5
    for t in (q, k, v):
        t.requires_grad_(grads)
    out, lse = block_sparse_attention(q, k, v, tables, scale, causal)
    ref, ref_lse = block_sparse_naive(q, k, v, mask, scale)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=tol, rtol=tol)
    assert (out[~finite] == 0).all()
    if grads:
        do = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), do)
        want = torch.autograd.grad(ref, (q, k, v), do.float())
        for name, a, b in zip("qkv", got, want, strict=True):
            assert not a.isnan().any(), f"NaN in d{name}"
            err, top = (a.float() - b).abs().max().item(), b.abs().max().item()
            assert err <= tol * 4 * max(1.0, top), f"d{name}: max error {err:.3g}, max |d{name}| {top:.3g}"


@pytest.mark.parametrize(
    ("bp", "hp", "n_q", "n_k", "causal", "columns"),
    [
        (2, 4, 30, 50, True, 5),  # per-head plans, cross, causal, columns
        (1, 1, 50, 30, False, 0),  # one shared plan, non-causal
        (1, 2, 40, 40, True, 3),  # per-kv-head plans (H_kv = 2)
    ],
)
def test_kernels_match_the_naive_twin(
    bp: int, hp: int, n_q: int, n_k: int, causal: bool, columns: int
) -> None:
    b, h, h_kv, d = bp, 4, 2, 16
    q = torch.randn(b, h, n_q, d, device=DEVICE)
    k = torch.randn(b, h_kv, n_k, d, device=DEVICE)
    v = torch.randn(b, h_kv, n_k, d, device=DEVICE)
    plan = random_plan(bp, hp, n_q, n_k, causal, 32, 0.4, columns, seed=n_q)
    _run_and_compare(q, k, v, plan, causal, grads=True, tol=1e-4)


def test_rows_without_keys_give_zeros_and_no_nan() -> None:
    n = 40
    full = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    full[0, 0, 1, 0] = True  # the second query block sees the first key block; the first sees nothing
    plan = Plan(n, n, False, 32, 32, full, torch.zeros_like(full), None, kind="dynamic")
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for _ in range(3))
    _run_and_compare(q, k, v, plan, False, grads=True, tol=1e-4)


def test_explicit_schedules_bypass_the_autotuner_with_the_same_result() -> None:
    """``config`` / ``dq_config`` / ``dkdv_config`` (benchmarks and schedule probes) launch the kernels
    directly and give the default launch's outputs and gradients (the same config here: the explicit path
    itself is what is checked)."""
    import triton

    from attnlab.kernels.block_sparse import op
    from attnlab.kernels.triton_utils import FP32_SHAPE

    q = torch.randn(1, 4, 40, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    plan = random_plan(1, 4, 40, 40, True, 32, 0.5, 3, seed=3)
    tables = tuple(t.to(DEVICE) for t in executor_tables(plan).as_args())
    m, n, w, st = op.INTERPRETED_SHAPE if DEVICE.type == "cpu" else FP32_SHAPE
    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, True)
    o2, lse2 = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, True, config=config)
    do = torch.randn_like(o)
    got = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, True)
    want = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, True, dq_config=config,
                                      dkdv_config=config)  # fmt: skip
    torch.testing.assert_close(o2, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse2, lse, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_split_query_tile_matches_the_plain_one(causal: bool) -> None:
    """SPLIT=2 (two row halves per program) gives the plain tile's output and lse, with partial tiles, token
    columns and a tail (N_q not a multiple of the tile)."""
    import triton

    from attnlab.kernels.block_sparse import op

    n_q, n_k = 70, 90
    q = torch.randn(1, 4, n_q, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, n_k, 16, device=DEVICE) for _ in range(2))
    plan = random_plan(1, 4, n_q, n_k, causal, 32, 0.5, 3, seed=5)
    tables = tuple(t.to(DEVICE) for t in executor_tables(plan).as_args())
    plain = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT": 1}, num_warps=4, num_stages=2)
    split = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT": 2}, num_warps=4, num_stages=2)
    want = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, causal, config=plain)
    got = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, causal, config=split)
    ref, _ = block_sparse_naive(q, k, v, plan.dense_mask(), 0.25)
    torch.testing.assert_close(want[0], ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the backward's split tiles (dQ: query halves; dK/dV: key halves) against the plain ones
    do = torch.randn_like(want[0])
    grads_plain = op.block_sparse_bwd_launch(do, q, k, v, *want, tables, 0.25, causal, dq_config=plain,
                                             dkdv_config=plain)  # fmt: skip
    grads_split = op.block_sparse_bwd_launch(do, q, k, v, *want, tables, 0.25, causal, dq_config=split,
                                             dkdv_config=split)  # fmt: skip
    for name, a, b in zip("qkv", grads_split, grads_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
    if causal:  # columns on the diagonal (its tile not visited): the halves' causal limits differ there
        full = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
        full[0, 0, 1, 0] = True
        cols = torch.tensor([[5, 20, -1, -1], [40, 45, 50, 60]], dtype=torch.int32).view(1, 1, 2, 4)
        diag = Plan(64, 64, True, 32, 32, full, torch.zeros_like(full), None, kind="dynamic", columns=cols)
        q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE) for _ in range(3))
        tables = tuple(t.to(DEVICE) for t in executor_tables(diag).as_args())
        got = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, True, config=split)
        ref, _ = block_sparse_naive(q, k, v, diag.dense_mask(), 0.25)
        torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=1e-4)
        do = torch.randn_like(ref)
        g_split = op.block_sparse_bwd_launch(do, q, k, v, *got, tables, 0.25, True, dq_config=split,
                                             dkdv_config=split)  # fmt: skip
        g_plain = op.block_sparse_bwd_launch(do, q, k, v, *got, tables, 0.25, True, dq_config=plain,
                                             dkdv_config=plain)  # fmt: skip
        for name, a, b in zip("qkv", g_split, g_plain, strict=True):
            torch.testing.assert_close(
                a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"diag d{name}: {m}"
            )


class _LaunchCount:
    """A kernel launcher that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel) -> None:  # type: ignore[no-untyped-def]
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):  # type: ignore[no-untyped-def]
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize(
    ("causal", "hp", "bp", "n_q", "n_k"),
    [(True, 4, 2, 70, 90), (False, 1, 1, 70, 90), (True, 2, 1, 70, 90), (True, 4, 1, 90, 40)],
)
def test_one_pass_backward_matches_the_two_kernels(
    causal: bool, hp: int, bp: int, n_q: int, n_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-pass backward (dQ added into a float32 buffer from the dK/dV kernel's tile pairs) gives the
    two-kernel backward's gradients: per-head, shared and per-kv-head plans, GQA 2:1, partial tiles, a tail
    (N_q, N_k not multiples of the tile), cross-attention (N_q > N_k causal: rows without keys); plans with
    token columns take the two kernels."""
    from attnlab.kernels.block_sparse import op

    finish = _LaunchCount(op.block_sparse_dq_finish_kernel)
    monkeypatch.setattr(op, "block_sparse_dq_finish_kernel", finish)
    q = torch.randn(bp, 4, n_q, 16, device=DEVICE)
    k, v = (torch.randn(bp, 2, n_k, 16, device=DEVICE) for _ in range(2))
    plan = random_plan(bp, hp, n_q, n_k, causal, 32, 0.5, 0, seed=7 + hp)
    tables = tuple(t.to(DEVICE) for t in executor_tables(plan).as_args())
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, causal)
    do = torch.randn_like(o)
    two = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, causal, fused=False)
    assert finish.launches == 0
    one = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, causal, fused=True)
    assert finish.launches == 1  # the one-pass path ran
    for name, a, b in zip("qkv", one, two, strict=True):
        assert not a.isnan().any(), f"NaN in d{name}"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, _ = block_sparse_naive(*leaves, plan.dense_mask(), 0.25)
    want = torch.autograd.grad(ref, leaves, do)
    for name, a, b in zip("qkv", one, want, strict=True):
        torch.testing.assert_close(
            a, b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name} vs naive: {m}"
        )
    cols = random_plan(bp, hp, n_q, n_k, causal, 32, 0.5, 3, seed=7 + hp)
    tables = tuple(t.to(DEVICE) for t in executor_tables(cols).as_args())
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, causal)
    fell_back = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, causal, fused=True)
    assert finish.launches == 1  # columns: the two kernels
    two = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, causal, fused=False)
    for a, b in zip(fell_back, two, strict=True):
        assert torch.equal(a, b)


def test_wide_row_offsets_give_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's int64 row offsets (taken where q's or dO's could pass 2^31; forced here) give the int32
    path's gradients, for transposed q and dO views."""
    from attnlab.kernels.block_sparse import op

    q = torch.randn(1, 40, 4, 16, device=DEVICE).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    plan = random_plan(1, 4, 40, 40, True, 32, 0.5, 0, seed=11)
    tables = tuple(t.to(DEVICE) for t in executor_tables(plan).as_args())
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, True)
    do = torch.randn(1, 40, 4, 16, device=DEVICE).transpose(1, 2)
    narrow = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, True)
    monkeypatch.setattr(op, "ROW_OFFSET_LIMIT", 0)
    wide = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 0.25, True)
    for name, a, b in zip("qkv", wide, narrow, strict=True):
        assert torch.equal(a, b), f"d{name}"


def test_autotuning_off_launches_the_first_fitting_config_directly() -> None:
    """With autotuning off the executor's launchers are not Triton autotuners (Triton 3.6's benchmarks
    even one pruned config per new key): each launches the first config that divides the plan's tiles,
    with the autotuned launch's result."""
    from attnlab.kernels.block_sparse import op

    q = torch.randn(1, 4, 40, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(2))
    plan = random_plan(1, 4, 40, 40, False, 32, 0.5, 0, seed=4)
    tables = tuple(t.to(DEVICE) for t in executor_tables(plan).as_args())
    saved = attnlab.settings.autotune
    try:
        attnlab.settings.autotune = True  # (the test session runs with autotuning off)
        assert not isinstance(op._pick(op._FWD), op._FirstFit)
        want = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, False)
        attnlab.settings.autotune = False
        launchers = [op._pick(v) for v in (op._FWD, op._DQ, op._DKDV)]
        assert all(isinstance(f, op._FirstFit) for f in launchers)
        got = op.block_sparse_fwd_launch(q, k, v, tables, 0.25, False)
    finally:
        attnlab.settings.autotune = saved
    first = launchers[0].config_for(BLOCK_Q=32, BLOCK_K=32, DOT_PREC="ieee")
    assert 32 % first.kwargs["BLOCK_M"] == 0 and 32 % first.kwargs["BLOCK_N"] == 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_first_fit_skips_a_config_the_compiler_refuses_and_remembers_it() -> None:
    """A config refused for its resources (OutOfResources at launch, e.g. shared memory at D > 128) is
    skipped for the next kept one, and not tried again for the same key."""
    import triton
    from triton.runtime.errors import OutOfResources

    from attnlab.kernels.block_sparse import op

    tried: list[int] = []

    class Kernel:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            def run(*args: object, **meta: object) -> str:
                tried.append(int(meta["BLOCK_M"]))  # type: ignore[call-overload]
                if meta["BLOCK_M"] == 64:
                    raise OutOfResources(270336, 232448, "shared memory")
                return "ran"

            return run

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=4, num_stages=2) for m in (64, 32)]
    launcher = op._FirstFit(Kernel(), configs)
    kwargs = {"BLOCK_Q": 64, "BLOCK_K": 64, "DOT_PREC": "tf32", "BLOCK_D": 256}
    assert launcher[(1,)](torch.empty(1), **kwargs) == "ran"
    assert launcher[(1,)](torch.empty(1), **kwargs) == "ran"
    assert tried == [64, 32, 32]


def test_columns_all_inside_visited_tiles_give_the_no_columns_form() -> None:
    """A plan whose columns all fall inside visited tiles has 1-wide column tables (no fp32 column buffers
    in the backward, no column loop)."""
    plan = random_plan(1, 2, 40, 40, False, 16, 0.3, 0, seed=2)
    full = plan.full | plan.partial
    full[..., 1] = True  # every row visits key tile 1 (keys 16..31)
    cols = torch.tensor([16, 20, 31], dtype=torch.int32).view(1, 1, 1, 3).expand(1, 2, 3, 3).contiguous()
    absorbed = Plan(40, 40, False, 16, 16, full, torch.zeros_like(full), None, kind="dynamic", columns=cols)
    t = executor_tables(absorbed)
    assert int(t.c_num.sum()) == 0 and t.c_idx.shape[-1] == 1 and not t.has_columns


def test_bf16_forward_within_the_rounding_of_its_output() -> None:
    q, k, v = (torch.randn(1, 2, 40, 24, device=DEVICE).bfloat16() for _ in range(3))
    plan = random_plan(1, 2, 40, 40, True, 32, 0.5, 4, seed=3)
    _run_and_compare(q, k, v, plan, True, grads=False, tol=2e-2)


def test_bad_input_gets_clear_errors() -> None:
    from attnlab.kernels.block_sparse.op import block_sparse_attention

    q = torch.randn(1, 2, 40, 16)
    kv = torch.randn(1, 2, 40, 16)
    plan = random_plan(1, 2, 40, 40, False, 32, 0.5, 0, seed=0)
    tables = executor_tables(plan).as_args()
    with pytest.raises(ValueError, match="N_q = 70"):  # the plan does not match q's length
        block_sparse_attention(torch.randn(1, 2, 70, 16), kv, kv, tables, 0.25, False)
    with pytest.raises(ValueError, match="plan is for"):  # 3 heads of plan for 2 query heads
        bad = random_plan(1, 3, 40, 40, False, 32, 0.5, 0, seed=0)
        block_sparse_attention(q, kv, kv, executor_tables(bad).as_args(), 0.25, False)
    with pytest.raises(ValueError, match="tiles of"):  # a tile the kernels cannot take
        odd = random_plan(1, 1, 40, 40, False, 24, 0.5, 0, seed=0)
        block_sparse_attention(q, kv, kv, executor_tables(odd).as_args(), 0.25, False)
    with pytest.raises(ValueError, match="13 tables"):
        block_sparse_attention(q, kv, kv, tables[:5], 0.25, False)
    shared = executor_tables(random_plan(1, 1, 40, 40, False, 32, 0.5, 0, seed=0)).as_args()
    with pytest.raises(ValueError, match="H a multiple of H_kv"):  # 3 query heads over 2 kv heads
        block_sparse_attention(torch.randn(1, 3, 40, 16), kv, kv, shared, 0.25, False)
    with pytest.raises(ValueError, match="q's batch"):  # k and v of batch 1 for q of batch 2
        block_sparse_attention(torch.randn(2, 2, 40, 16), kv, kv, shared, 0.25, False)
    with pytest.raises(ValueError, match="the same"):  # v shorter than k
        block_sparse_attention(q, kv, kv[:, :, :30], tables, 0.25, False)
    with pytest.raises(ValueError, match="takes \\(B, H, N, D\\)"):
        block_sparse_attention(q[0], kv[0], kv[0], tables, 0.25, False)
    if on_cuda():
        with pytest.raises(ValueError, match="build the plan on q's device"):
            block_sparse_attention(q.cuda(), kv.cuda(), kv.cuda(), tables, 0.25, False)


def test_the_backend_runs_the_static_methods_and_returns_its_plan() -> None:
    q, k, v = (torch.randn(1, 2, 70, 16, device=DEVICE) for _ in range(3))
    res = attnlab.attention(
        q, k, v, method="streaming", causal=True, sinks=3, window=20, backend="block_sparse", return_plan=True,
        return_lse=True,
    )  # fmt: skip
    ref = attnlab.attention(q, k, v, method="streaming", causal=True, sinks=3, window=20, backend="reference")
    torch.testing.assert_close(res.out, ref, atol=1e-5, rtol=1e-5)
    assert res.plan is not None and res.plan.block_q == (128 if on_cuda() else 32)
    assert res.lse is not None and res.lse.shape == (1, 2, 70)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("n", "density", "causal", "columns"),
    [(8192, 0.1, True, 0), (8192, 0.25, False, 0), (4096, 0.05, True, 64), (4096, 0.1, False, 64)],
)
def test_full_size_random_plans_on_cuda(n: int, density: float, causal: bool, columns: int) -> None:
    """The default tiles and autotuned schedules at benchmark sizes (bf16, D=128, GQA 4:1), fwd + bwd."""
    attnlab.settings.autotune = True
    limit = attnlab.settings.max_dense_elements
    attnlab.settings.max_dense_elements = 1 << 40  # the naive twin is dense on purpose
    try:
        q = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        plan = random_plan(1, 8, n, n, causal, 128, density, columns, seed=n)
        plan = Plan(
            plan.n_q, plan.n_k, causal, 128, 128, plan.full.cuda(), plan.partial.cuda(), plan.mask_mod,
            kind="dynamic", columns=plan.columns.cuda() if plan.columns is not None else None,
        )  # fmt: skip
        _run_and_compare(q, k, v, plan, causal, grads=True, tol=3e-2)
    finally:
        attnlab.settings.autotune = False
        attnlab.settings.max_dense_elements = limit


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("n", "density", "causal"), [(8192, 0.1, True), (8192, 0.25, False), (4096, 0.1, False)]
)
def test_full_size_one_pass_backward_on_cuda(n: int, density: float, causal: bool) -> None:
    """The one-pass backward (dQ by tensor-descriptor reductions on Hopper) at benchmark sizes, autotuned,
    against the naive twin and the two-kernel backward (bf16, D=128, GQA 4:1)."""
    from attnlab.kernels.block_sparse import op

    attnlab.settings.autotune = True
    limit = attnlab.settings.max_dense_elements
    attnlab.settings.max_dense_elements = 1 << 40  # the naive twin is dense on purpose
    saved = op.FUSED_BWD
    try:
        op.FUSED_BWD = True
        q = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        plan = random_plan(1, 8, n, n, causal, 128, density, 0, seed=n)
        plan = Plan(plan.n_q, plan.n_k, causal, 128, 128, plan.full.cuda(), plan.partial.cuda(), plan.mask_mod,
                    kind="dynamic")  # fmt: skip
        _run_and_compare(q, k, v, plan, causal, grads=True, tol=3e-2)
        tables = tuple(t for t in executor_tables(plan).as_args())
        o, lse = op.block_sparse_fwd_launch(q, k, v, tables, 128**-0.5, causal)
        do = torch.randn_like(o)
        one = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 128**-0.5, causal, fused=True)
        two = op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, 128**-0.5, causal, fused=False)
        for name, a, b in zip("qkv", one, two, strict=True):
            err, top = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
            assert err <= 1e-2 * top, f"d{name}: one-pass vs two kernels {err:.3g} (max |d{name}| {top:.3g})"
    finally:
        op.FUSED_BWD = saved
        attnlab.settings.autotune = False
        attnlab.settings.max_dense_elements = limit
