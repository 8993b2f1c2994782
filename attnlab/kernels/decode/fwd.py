"""Decode over selected cache entries (Triton): split-K partials, their merge, and Quest page scores.

``decode_split_kernel``. Grid: (splits, cdiv(GROUP * N_Q, BLOCK_M), B * H_KV). Program (s, m, b*h_kv) takes
the rows [m*BLOCK_M, (m+1)*BLOCK_M) of the group's GROUP * N_Q query rows (row r is query head
``h_kv * GROUP + r // N_Q``, query ``r % N_Q``), so one K/V tile read serves every query head of the group.
It walks the entries [s*PER_SPLIT, min((s+1)*PER_SPLIT, count)) of the (b, h_kv) index list; entry e
covers the PAGE cache tokens ``IDX[e] * PAGE + [0, PAGE)``; an entry < 0 covers nothing. A token is
allowed when it exists (< N_K), and, when CAUSAL, sits at or before the row's position
``r % N_Q + N_K - N_Q`` (bottom-right alignment), and, with HAS_KMASK, its key-mask entry
``KMASK[b, t] > 0`` (padding, e.g. a batch's left padding, is never attended). Online softmax in base 2, fp32 accumulation; it writes
the split's normalised output and natural-log lse (0 and -inf for a split that saw no allowed token).

``decode_merge_kernel``. Grid: (B * H_KV * GROUP * N_Q,). Merges one row's splits by their lse:
``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s`` (0 and -inf when every split is empty).

``row_topk_kernel``. Grid: (rows,). The positions of each row's K largest values, ascending (a
candidate for the selection's top-k; see its docstring).

``page_score_kernel``. Grid: (cdiv(N_PAGES, BLOCK_P), B * H_KV). Quest's upper bound of q . k over a page
from its elementwise key max and min, ``u = sum_d max(q_d max_d, q_d min_d)`` in fp32, reduced over the
group's GROUP * N_Q query rows by max (REDUCE_MAX) or mean.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 (UPCAST: both operands in fp32 first; Triton's CPU interpreter multiplies bf16 tiles
    as raw integers, so interpreted bf16 runs multiply the already-rounded values in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def decode_split_kernel(
    Q, K, V, IDX, CNT, KMASK, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih, stride_mb,
    H_KV, N_Q, N_K, N_IDX, PER_SPLIT, HEAD_D, scale,
    GROUP: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_CNT: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    mblk = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H_KV).to(tl.int64)
    hk = bh % H_KV
    n_rows = GROUP * N_Q
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    head = hk * GROUP + rows // N_Q
    qi = rows % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q_ptr = (
        Q + b * stride_qb + head[:, None].to(tl.int64) * stride_qh + qi[:, None] * stride_qn + offs_d[None, :]
    )
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos = qi + N_K - N_Q

    if HAS_CNT:  # noqa: SIM108 (constexpr branches)
        n_valid = tl.minimum(tl.load(CNT + b * H_KV + hk), N_IDX)
    else:
        n_valid = N_IDX
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, n_valid)
    ENT: tl.constexpr = BLOCK_N // PAGE
    qk_scale = scale * 1.4426950408889634
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh
    i_base = IDX + b * stride_ib + hk.to(tl.int64) * stride_ih

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for e0 in range(start, end, ENT):
        ent = e0 + offs_n // PAGE
        ent_ok = ent < end
        pg = tl.load(i_base + ent, mask=ent_ok, other=-1)
        tok = pg * PAGE + offs_n % PAGE
        tok_ok = ent_ok & (pg >= 0) & (tok < N_K)
        if HAS_KMASK:
            tok_ok = tok_ok & (tl.load(KMASK + b * stride_mb + tok, mask=tok_ok, other=0) > 0)
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + tok[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        allowed = tok_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (tok[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + tok[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    n_splits = tl.num_programs(0)
    part = (bh.to(tl.int64) * n_splits + split) * n_rows + rows
    tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def decode_merge_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_on,
    H_KV, N_Q, SPLITS, HEAD_D,
    GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_rows = GROUP * N_Q
    bh = pid // n_rows
    r = pid % n_rows
    b = bh // H_KV
    hk = bh % H_KV
    head = hk * GROUP + r // N_Q
    qi = r % N_Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    part = (bh.to(tl.int64) * SPLITS + offs_s) * n_rows + r
    lse_s = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_safe)
    tot = tl.sum(w, 0)
    o_s = tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
    lse = tl.where(tot > 0.0, mx_safe + tl.log(tl.where(tot > 0.0, tot, 1.0)), float("-inf"))
    o_ptr = O + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + qi * stride_on + offs_d
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=offs_d < HEAD_D)
    tl.store(LSE + (b.to(tl.int64) * H_KV * GROUP + head) * N_Q + qi, lse)


@triton.jit
def page_score_kernel(
    Q, KMAX, KMIN, OUT,
    stride_qb, stride_qh, stride_qn,
    stride_sb, stride_sh, stride_sp,
    H_KV, N_Q, N_PAGES, HEAD_D,
    GROUP: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = bh % H_KV
    pages = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = pages < N_PAGES
    d_ok = offs_d < HEAD_D
    off = (
        b * stride_sb
        + hk.to(tl.int64) * stride_sh
        + pages[:, None].to(tl.int64) * stride_sp
        + offs_d[None, :]
    )
    msk = p_ok[:, None] & d_ok[None, :]
    kmax = tl.load(KMAX + off, mask=msk, other=0.0).to(tl.float32)
    kmin = tl.load(KMIN + off, mask=msk, other=0.0).to(tl.float32)
    if REDUCE_MAX:  # noqa: SIM108
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    else:
        best = tl.zeros([BLOCK_P], tl.float32)
    for r in range(0, GROUP * N_Q):
        head = hk * GROUP + r // N_Q
        qi = r % N_Q
        q_ptr = Q + b * stride_qb + head.to(tl.int64) * stride_qh + qi * stride_qn + offs_d
        qr = tl.load(q_ptr, mask=d_ok, other=0.0).to(tl.float32)
        u = tl.sum(tl.maximum(qr[None, :] * kmax, qr[None, :] * kmin), 1)
        if REDUCE_MAX:  # noqa: SIM108
            best = tl.maximum(best, u)
        else:
            best = best + u
    if not REDUCE_MAX:
        best = best / (GROUP * N_Q)
    tl.store(OUT + (bh.to(tl.int64) * N_PAGES + pages), best, mask=p_ok)


@triton.jit
def row_topk_kernel(X, OUT, N, K, stride_x, stride_o, BLOCK: tl.constexpr):
    """Grid: (rows,). The K largest of the row's N fp32 values, their positions written to OUT in
    ascending order (ties at the K-th value: the lowest positions). The row lives in registers (N <= BLOCK):
    the K-th value is found by a 32-step binary search over an order-preserving int32 image of the floats
    (count of keys >= t), then a prefix sum places the chosen positions."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as signed int order
    key = tl.where(ok, key, -2147483648)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):  # invariant: at least K keys >= lo
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.sum((ok & (key >= mid)).to(tl.int32), 0)
        take_mid = cnt >= K
        lo = tl.where(take_mid, mid, lo)
        hi = tl.where(take_mid, hi, mid - 1)
    greater = ok & (key > lo)
    equal = ok & (key == lo)
    need = K - tl.sum(greater.to(tl.int32), 0)
    rank = tl.cumsum(equal.to(tl.int32), 0)
    take = greater | (equal & (rank <= need))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(OUT + row * stride_o + pos, offs, mask=take)
