"""Block-sparse FlashAttention forward (Triton): visits only the tiles and token columns of a plan.

Grid: (cdiv(N_q, BLOCK_M), B * H). Program (m, b*h) computes query rows [m*BLOCK_M, (m+1)*BLOCK_M) of
head h, which lie in plan row ``r = m*BLOCK_M // BLOCK_Q`` (BLOCK_M divides BLOCK_Q). With the plan's
tables at (b or 0, h // HEAD_DIV, r) (``common.table_offset``: plan batch 1 broadcasts; a plan for H_kv heads
is read by the query heads of each GQA group, one for 1 head by all), it runs an online softmax (base 2,
fp32 running max, sum and accumulator) over:

1. the full tiles: no mask (they lie inside the matrix by the tables' convention);
2. the partial tiles: key block ``kb`` with pattern ``u``; a score counts where
   ``PATTERNS[u, i % BLOCK_Q, j % BLOCK_K]`` is 1 (positions past N_k are 0 there);
3. the token columns, BLOCK_N at a time, gathered rows of K and V; -1 padding and, when CAUSAL, keys
   past the query's position ``i + OFFSET`` are masked. Only when HAS_COLS: column tables 1 wide mean
   "no columns" (:attr:`attnlab.plans.executor.ExecutorTables.has_columns`), so no launch reads the
   device to decide it.

SPLIT = 2 (a schedule knob, as in the sigmoid and score-transform kernels): the query tile is two row halves
whose score products are issued before either half's exponentials (FlashAttention-3's intra-warpgroup
overlap, left to Triton); each half keeps its own (acc, max, sum).

Each plan tile of BLOCK_K keys is read in BLOCK_K // BLOCK_N steps, one flat loop over the steps of all
listed tiles (so Triton pipelines loads across tiles). TMA: the tiles of K and V move by tensor descriptors
built in the kernel (Hopper's copy engine; rows past N_k read as 0), else by masked pointer loads; the
gathered columns always by pointer loads. GQA: head h reads kv head h // GROUP.
Output: O = acc / l (0 where no key counted) and lse = m + log(l) in natural log (-inf there).
"""

import triton
import triton.language as tl

from attnlab.kernels.block_sparse.common import (
    attend,
    attend_scores,
    column_keys,
    dot,
    kv_tile,
    rounded,
    table_offset,
    tile_source,
)

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _q_rows(Q, q_base, stride_qn, offs_m, offs_d, N_Q, HEAD_D, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):
    """Query rows ``offs_m`` (rows past N_q and columns past HEAD_D read as 0)."""
    q_ptrs = Q + q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    if EVEN_M and EVEN_D:
        return tl.load(q_ptrs)
    else:
        return tl.load(q_ptrs, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D), other=0.0)


@triton.jit
def _store_half(O, o_base, stride_on, LSE, lse_base, acc, m_i, l_i, offs_m, offs_d, N_Q, HEAD_D,
                UPCAST: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):  # fmt: skip
    """O = acc / l (0 where no key counted) and lse = m + log(l) (natural log; -inf there) of rows offs_m."""
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + o_base + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, rounded(out, O.dtype.element_ty, UPCAST))
    else:
        tl.store(
            o_ptrs,
            rounded(out, O.dtype.element_ty, UPCAST),
            mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D),
        )
    if EVEN_M:
        tl.store(LSE + lse_base + offs_m, lse)
    else:
        tl.store(LSE + lse_base + offs_m, lse, mask=offs_m < N_Q)


@triton.jit(do_not_specialize=LENGTH_ARGS)
def block_sparse_fwd_kernel(
    Q, K, V, O, LSE,
    P_NUM, P_IDX, P_PAT, F_NUM, F_IDX, C_NUM, C_IDX, PATTERNS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    s_pn, s_pi, s_fn, s_fi, s_cn, s_ci,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, qk_scale, PLAN_H, HEAD_DIV,
    PLAN_B: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, HAS_COLS: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_M // SPLIT
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row = start_m // BLOCK_Q
    sub_m = start_m % BLOCK_Q
    offs_m0 = start_m + tl.arange(0, HALF)
    offs_m1 = offs_m0 + HALF
    offs_d = tl.arange(0, BLOCK_D)
    rows_sub0 = sub_m + tl.arange(0, HALF)
    rows_sub1 = rows_sub0 + HALF
    q_base = b * stride_qb + h * stride_qh
    q0 = _q_rows(Q, q_base, stride_qn, offs_m0, offs_d, N_Q, HEAD_D, EVEN_M, EVEN_D)
    q1 = q0
    if SPLIT == 2:
        q1 = _q_rows(Q, q_base, stride_qn, offs_m1, offs_d, N_Q, HEAD_D, EVEN_M, EVEN_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k_src = tile_source(k_base, stride_kn, N_K, HEAD_D, BLOCK_N, BLOCK_D, TMA)
    v_src = tile_source(v_base, stride_vn, N_K, HEAD_D, BLOCK_N, BLOCK_D, TMA)
    m0 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([HALF], dtype=tl.float32)
    acc0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    m1 = m0
    l1 = l0
    acc1 = acc0
    SUB: tl.constexpr = BLOCK_K // BLOCK_N  # kernel steps per plan tile; the loops run over steps

    # 1. full tiles (no mask)
    t_fn, t_fi = table_offset(b, h, row, s_fn, s_fi, PLAN_B, PLAN_H, HEAD_DIV)
    n_full = tl.load(F_NUM + t_fn)
    for it in tl.range(0, n_full * SUB):
        kb = tl.load(F_IDX + t_fi + it // SUB)
        start_n = kb * BLOCK_K + (it % SUB) * BLOCK_N
        k, v = kv_tile(k_src, v_src, stride_kn, stride_vn, start_n, offs_d, N_K, HEAD_D, BLOCK_N, True, EVEN_D,
                       TMA)  # fmt: skip
        s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
        if SPLIT == 2:
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)  # issued before the first half's exponentials
            acc0, m0, l0 = attend_scores(acc0, m0, l0, s0, v, qk_scale, False, False, DOT_PREC, UPCAST)
            acc1, m1, l1 = attend_scores(acc1, m1, l1, s1, v, qk_scale, False, False, DOT_PREC, UPCAST)
        else:
            acc0, m0, l0 = attend_scores(acc0, m0, l0, s0, v, qk_scale, False, False, DOT_PREC, UPCAST)

    # 2. partial tiles (token mask from the pattern)
    t_pn, t_pi = table_offset(b, h, row, s_pn, s_pi, PLAN_B, PLAN_H, HEAD_DIV)
    n_partial = tl.load(P_NUM + t_pn)
    for it in tl.range(0, n_partial * SUB):
        kb = tl.load(P_IDX + t_pi + it // SUB)
        pat = tl.load(P_PAT + t_pi + it // SUB).to(tl.int64)
        sub = (it % SUB) * BLOCK_N
        k, v = kv_tile(k_src, v_src, stride_kn, stride_vn, kb * BLOCK_K + sub, offs_d, N_K, HEAD_D, BLOCK_N, False,
                       EVEN_D, TMA)  # fmt: skip
        cols_sub = sub + tl.arange(0, BLOCK_N)
        pat_base = PATTERNS + pat * (BLOCK_Q * BLOCK_K) + cols_sub[None, :]
        s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
        if SPLIT == 2:
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)
            keep0 = tl.load(pat_base + rows_sub0[:, None] * BLOCK_K) != 0
            keep1 = tl.load(pat_base + rows_sub1[:, None] * BLOCK_K) != 0
            acc0, m0, l0 = attend_scores(acc0, m0, l0, s0, v, qk_scale, keep0, True, DOT_PREC, UPCAST)
            acc1, m1, l1 = attend_scores(acc1, m1, l1, s1, v, qk_scale, keep1, True, DOT_PREC, UPCAST)
        else:
            keep0 = tl.load(pat_base + rows_sub0[:, None] * BLOCK_K) != 0
            acc0, m0, l0 = attend_scores(acc0, m0, l0, s0, v, qk_scale, keep0, True, DOT_PREC, UPCAST)

    # 3. token columns (gathered rows), when the tables have them (1-wide column tables: none)
    if HAS_COLS:
        t_cn, t_ci = table_offset(b, h, row, s_cn, s_ci, PLAN_B, PLAN_H, HEAD_DIV)
        n_cols = tl.load(C_NUM + t_cn)
        for c0 in range(0, n_cols, BLOCK_N):
            idx, valid, k, v, keep0 = column_keys(C_IDX, t_ci, c0, n_cols, k_base, v_base, stride_kn, stride_vn,
                                                  offs_m0, offs_d, N_K, HEAD_D, OFFSET, BLOCK_N, CAUSAL,
                                                  EVEN_D)  # fmt: skip
            acc0, m0, l0 = attend(acc0, m0, l0, q0, k, v, qk_scale, keep0, True, DOT_PREC, UPCAST)
            if SPLIT == 2:
                keep1 = valid[None, :]
                if CAUSAL:
                    keep1 = keep1 & (idx[None, :] <= offs_m1[:, None] + OFFSET)
                acc1, m1, l1 = attend(acc1, m1, l1, q1, k, v, qk_scale, keep1, True, DOT_PREC, UPCAST)

    o_base = b * stride_ob + h * stride_oh
    lse_base = pid_bh.to(tl.int64) * N_Q
    _store_half(O, o_base, stride_on, LSE, lse_base, acc0, m0, l0, offs_m0, offs_d, N_Q, HEAD_D, UPCAST, EVEN_M,
                EVEN_D)  # fmt: skip
    if SPLIT == 2:
        _store_half(O, o_base, stride_on, LSE, lse_base, acc1, m1, l1, offs_m1, offs_d, N_Q, HEAD_D, UPCAST,
                    EVEN_M, EVEN_D)  # fmt: skip
