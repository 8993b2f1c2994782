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
WRITE_LOGITS: it also stores each visited score ``scale * q . k`` (natural-log units; -inf where not
allowed) to ``LOGITS[b, head, i, e * PAGE + offset]`` (fp32, (B, H, N_Q, N_IDX * PAGE) contiguous): the
scores of the attention itself, for selections that keep the tokens a step attended to most.
WRITE_LOGITS == 2: instead their maximum over the group's GROUP * N_Q rows, ``LOGITS[b, h_kv, e * PAGE +
offset]`` ((B, H_KV, N_IDX * PAGE); needs one row block: GROUP * N_Q <= BLOCK_M).
RANGES (PAGE 1, no index list, no count): row (b, h_kv) reads the tokens ``[0, N_K)`` when ``FULL[b, h_kv]``
is non-zero, else ``[first, first + sink) + [WIN, N_K)`` with ``first = FIRST[b]`` (0 without HAS_FIRST) and
``sink = clamp(min(first + SINK, WIN) - first, 0)`` (the sinks that lie before the window): a position ``v``
of the row's list is the token ``first + v`` below ``sink``, else ``WIN + v - sink`` (retrieval_heads_kv:
full KV heads beside sink + window ones, read contiguously without an index tensor). A split past its
row's list stores nothing; split 0 of row block 0 stores the row's split count to ``NSPLIT[b * H_KV +
h_kv]`` for the merge (``decode_merge_kernel``'s ROW_SPLITS).
MERGE: each program then counts itself done on its (b*h_kv, m) counter ``DONE[b*h_kv * m_blocks + m]``
(an atomic after a barrier; zero between launches), and the last one to finish merges those rows as
``decode_merge_kernel`` does (reading the partials past L1) into O / LSE and zeroes the counter again:
one launch instead of two (needs BLOCK_S >= splits).

``decode_merge_kernel``. Grid: (B * H_KV * GROUP * N_Q,). Merges one row's splits by their lse:
``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s`` (0 and -inf when every split is empty).

``row_topk_kernel``. Grid: (rows,). The positions of each row's K largest values, ascending (a
candidate for the selection's top-k; see its docstring).

``page_select_kernel``. Grid: (cdiv(N_PAGES, BLOCK_P * TILES), B * H_KV). page_topk's whole selection in
one launch. Program (pb, b*h_kv) owns TILES tiles of BLOCK_P pages: it (1) recomputes the page summaries
(elementwise key max / min of the real tokens) of its pages >= FIRST_UPDATE from K (a decode step's appended tokens; none when FIRST_UPDATE = N_PAGES),
(2) scores its BLOCK_P pages as ``page_score_kernel`` does (DOT: as two tensor-core products of the
group's query rows, split by sign, with the summaries; DOT and LEAN: the bf16 summaries go into the
products as loaded, and a page of padding only, told by its channel 0, gets -inf after the products instead
of zeroed summaries before them), pages with no real token (max < min) -inf,
pages >= FIRST_FORCED +inf, into SCORES, then (3) counts itself done on the row's counter (an atomic); the
row's last program to finish reads the row's scores back and writes the positions of its KEEP largest,
ascending (ties at the KEEP-th value: the lowest positions), to IDX, and resets the counter to 0 (so the
counters stay zero between launches and the launch replays in a CUDA graph). SELECT=False: steps 1-2 only.

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
    Q, K, V, IDX, CNT, KMASK, O_PART, LSE_PART, DONE, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih, stride_mb,
    stride_ob, stride_oh, stride_on,
    H_KV, N_Q, N_K, N_IDX, PER_SPLIT, HEAD_D, scale,
    GROUP: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_CNT: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EARLY_V: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_S: tl.constexpr, LOGITS=None, WRITE_LOGITS: tl.constexpr = 0,
    RANGES: tl.constexpr = False, FULL=None, stride_fb=0, FIRST=None, HAS_FIRST: tl.constexpr = False,
    NSPLIT=None, SINK=0, WIN=0,
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

    r_first = 0
    r_sink = 0
    r_win = 0
    if RANGES:  # the row's token list: [0, N_K), or sinks + window (docstring)
        r_full = tl.load(FULL + b * stride_fb + hk) != 0
        if HAS_FIRST:
            r_first = tl.load(FIRST + b).to(tl.int32)
        r_sink = tl.maximum(tl.minimum(r_first + SINK, WIN) - r_first, 0)
        r_first = tl.where(r_full, 0, r_first)
        r_sink = tl.where(r_full, 0, r_sink)
        r_win = tl.where(r_full, 0, WIN)
        n_valid = r_sink + N_K - r_win
    elif HAS_CNT:
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
        if RANGES:  # (PAGE 1) list position -> token, contiguous runs
            ent = e0 + offs_n
            ent_ok = ent < end
            tok = tl.where(ent < r_sink, r_first + ent, r_win + ent - r_sink)
            tok_ok = ent_ok & (tok < N_K)
        else:
            ent = e0 + offs_n // PAGE
            ent_ok = ent < end
            pg = tl.load(i_base + ent, mask=ent_ok, other=-1)
            tok = pg * PAGE + offs_n % PAGE
            tok_ok = ent_ok & (pg >= 0) & (tok < N_K)
        if HAS_KMASK:
            tok_ok = tok_ok & (tl.load(KMASK + b * stride_mb + tok, mask=tok_ok, other=0) > 0)
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + tok[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if EARLY_V:  # V's load issued with K's (a split of one step has no loop for the pipeliner to overlap)
            v = tl.load(
                v_base + tok[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0
            )
        s = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        allowed = tok_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (tok[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        if WRITE_LOGITS == 1:  # the scores in natural-log units at their column e * PAGE + offset
            col = e0 * PAGE + offs_n
            l_row = (b * H_KV * GROUP + head.to(tl.int64)) * N_Q + qi
            tl.store(
                LOGITS + l_row[:, None] * (N_IDX * PAGE) + col[None, :],
                s * 0.6931471805599453,
                mask=row_ok[:, None] & ent_ok[None, :],
            )
        if WRITE_LOGITS == 2:  # their max over the group's rows (one row block holds them all)
            col = e0 * PAGE + offs_n
            tl.store(
                LOGITS + bh.to(tl.int64) * (N_IDX * PAGE) + col,
                tl.max(s, 0) * 0.6931471805599453,
                mask=ent_ok,
            )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not EARLY_V:
            v = tl.load(
                v_base + tok[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0
            )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    n_splits = tl.num_programs(0)
    part = (bh.to(tl.int64) * n_splits + split) * n_rows + rows
    keep = row_ok
    if RANGES:  # splits past the row's list store nothing; the merge reads the row's count of splits
        keep = tl.where((start < n_valid) | (split == 0), row_ok, False)
        if (split == 0) & (mblk == 0):
            tl.store(NSPLIT + bh, tl.minimum(tl.maximum(tl.cdiv(n_valid, PER_SPLIT), 1), n_splits))
    tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], o, mask=keep[:, None])
    tl.store(LSE_PART + part, lse, mask=keep)
    if MERGE:  # the group's last split to finish merges its rows (no second launch)
        tl.debug_barrier()  # every thread's partial stores before the release below
        slot = bh * tl.num_programs(1) + mblk
        done = tl.atomic_add(DONE + slot, 1, sem="acq_rel")
        if done == n_splits - 1:
            for r in range(mblk * BLOCK_M, tl.minimum(mblk * BLOCK_M + BLOCK_M, n_rows)):
                _merge_row(O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, stride_on, bh, r, 0, H_KV, N_Q,
                           n_splits, n_splits, HEAD_D, BLOCK_D, GROUP, BLOCK_S, BLOCK_D, True)  # fmt: skip
            tl.atomic_xchg(DONE + slot, 0)  # zero again for the next launch (and a CUDA graph's replay)


@triton.jit
def _merge_row(
    O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, stride_on, bh, r, d0, H_KV, N_Q, SPLITS, USED, HEAD_D,
    PART_D, GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COHERENT: tl.constexpr,
):  # fmt: skip
    """Merge channels [d0, d0 + BLOCK_D) of row ``r`` of group ``bh``'s first USED of its SPLITS partials
    (rows of PART_D floats) by their lse into O, and (d0 = 0) the row's lse into LSE (COHERENT: read the
    partials past L1, as other programs of the same launch wrote them)."""
    n_rows = GROUP * N_Q
    b = bh // H_KV
    hk = bh % H_KV
    head = hk * GROUP + r // N_Q
    qi = r % N_Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    s_ok = offs_s < USED
    part = (bh.to(tl.int64) * SPLITS + offs_s) * n_rows + r
    o_part = O_PART + part[:, None] * PART_D + offs_d[None, :]
    if COHERENT:
        lse_s = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(o_part, mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
    else:
        lse_s = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
        o_s = tl.load(o_part, mask=s_ok[:, None], other=0.0)
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_safe)
    tot = tl.sum(w, 0)
    o = tl.sum(o_s * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
    lse = tl.where(tot > 0.0, mx_safe + tl.log(tl.where(tot > 0.0, tot, 1.0)), float("-inf"))
    o_ptr = O + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + qi * stride_on + offs_d
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=offs_d < HEAD_D)
    tl.store(LSE + (b.to(tl.int64) * H_KV * GROUP + head) * N_Q + qi, lse, mask=d0 == 0)


@triton.jit
def decode_merge_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_on,
    H_KV, N_Q, SPLITS, HEAD_D,
    PART_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    NSPLIT=None, ROW_SPLITS: tl.constexpr = False,
):  # fmt: skip
    """Grid: (rows, PART_D // BLOCK_D): program (row, c) merges channels [c * BLOCK_D, (c + 1) * BLOCK_D).
    ROW_SPLITS: a group's row merges only its first ``NSPLIT[group]`` splits (the split kernel's RANGES)."""
    pid = tl.program_id(0)
    n_rows = GROUP * N_Q
    bh = pid // n_rows
    used = SPLITS
    if ROW_SPLITS:
        used = tl.load(NSPLIT + bh)
    _merge_row(O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, stride_on, bh, pid % n_rows,
               tl.program_id(1) * BLOCK_D, H_KV, N_Q, SPLITS, used, HEAD_D, PART_D, GROUP, BLOCK_S, BLOCK_D,
               False)  # fmt: skip


@triton.jit
def _elementwise_bound(
    Q_B, stride_qh, stride_qn, hk, N_Q, offs_d, d_ok, kmax, kmin,
    GROUP: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Quest's bound of BLOCK_P pages (kmax / kmin (BLOCK_P, BLOCK_D) fp32) for the GROUP * N_Q query rows
    of KV head hk (Q_B: the batch element's q), one row at a time (elementwise products and a sum over the
    head dim), reduced over the rows by max (REDUCE_MAX) or mean."""
    if REDUCE_MAX:  # noqa: SIM108
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    else:
        best = tl.zeros([BLOCK_P], tl.float32)
    for r in range(0, GROUP * N_Q):
        head = hk * GROUP + r // N_Q
        qi = r % N_Q
        qr = tl.load(Q_B + head.to(tl.int64) * stride_qh + qi * stride_qn + offs_d, mask=d_ok, other=0.0)
        qr = qr.to(tl.float32)
        u = tl.sum(tl.maximum(qr[None, :] * kmax, qr[None, :] * kmin), 1)
        if REDUCE_MAX:  # noqa: SIM108
            best = tl.maximum(best, u)
        else:
            best = best + u
    if not REDUCE_MAX:
        best = best / (GROUP * N_Q)
    return best


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
    best = _elementwise_bound(
        Q + b * stride_qb, stride_qh, stride_qn, hk, N_Q, offs_d, d_ok, kmax, kmin, GROUP, REDUCE_MAX, BLOCK_P
    )
    tl.store(OUT + (bh.to(tl.int64) * N_PAGES + pages), best, mask=p_ok)


@triton.jit
def row_topk_kernel(
    X, OUT, ROUNDS, N, K, stride_x, stride_o,
    BLOCK: tl.constexpr, EARLY: tl.constexpr, THRESHOLDS: tl.constexpr, COUNT_ROUNDS: tl.constexpr,
    BMAX: tl.constexpr,
):  # fmt: skip
    """Grid: (rows,). The K largest of the row's N fp32 values, their positions written to OUT in
    ascending order (ties at the K-th value: the lowest positions). The row lives in registers (N <= BLOCK):
    the K-th value is found by a search over an order-preserving integer image of the floats (THRESHOLDS
    per round, 0: the 3-way search; EARLY: stopping once the bracket holds it alone), then a prefix sum
    places the chosen positions (``_store_topk``, shared with ``page_select_kernel``). COUNT_ROUNDS: the
    search's rounds go to ROUNDS[row] (int32)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    rounds = _store_topk(x, ok, offs, N, K, OUT + row * stride_o, EARLY, THRESHOLDS, BMAX)
    if COUNT_ROUNDS:
        tl.store(ROUNDS + row, rounds)


@triton.jit
def _order_key(x):
    """An int32 image of fp32 values whose signed order is the floats' order (-0 and +0 one key: they
    tie, as for the rule)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # (-0 + 0 = +0)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(key, ok, K, EARLY: tl.constexpr):
    """The K-th largest of the int32 keys where ``ok`` (1 <= K <= their count <= 32767): the largest t
    with at least K keys >= t, by a 3-way search over [min key, max key] (two thresholds counted per step
    in one reduction of a packed int32: ~20 reduction rounds instead of a binary search's 32), and the
    rounds it took.

    EARLY: the search also stops as soon as exactly K keys are >= its lower end ``lo`` and returns that
    ``lo``, which may lie below the K-th largest key: for ``_store_topk`` it is the same threshold (the keys
    above it and the first of the keys equal to it make the K). Scores are sparse in the 2^32 key range,
    so a bracket holds K keys long before it narrows to one value: fewer rounds, the same positions."""
    lo = tl.min(tl.where(ok, key, 2147483647), 0).to(tl.int64)  # invariant: >= K keys >= lo
    hi = tl.max(tl.where(ok, key, -2147483648), 0).to(tl.int64)  # and fewer than K keys > hi
    n_lo = tl.sum(ok.to(tl.int32), 0)  # keys >= lo
    rounds = 0
    go = lo < hi
    if EARLY:
        go = go & (n_lo != K)
    while go:
        size = hi - lo + 1
        t1 = lo + size // 3
        t2 = lo + (2 * size) // 3
        both = (ok & (key >= t1.to(tl.int32))).to(tl.int32) + (
            (ok & (key >= t2.to(tl.int32))).to(tl.int32) << 16
        )
        tot = tl.sum(both, 0)
        c1 = tot & 0xFFFF
        c2 = tot >> 16
        new_lo = tl.where(c2 >= K, t2, tl.where(c1 >= K, t1, lo))
        n_lo = tl.where(c2 >= K, c2, tl.where(c1 >= K, c1, n_lo))
        hi = tl.where(c1 < K, t1 - 1, tl.where(c2 < K, t2 - 1, hi))
        lo = new_lo
        rounds += 1
        go = lo < hi
        if EARLY:
            go = go & (n_lo != K)
    return lo.to(tl.int32), rounds


@triton.jit
def _offset(span, step, i):
    """A round's i-th threshold (i >= 1) above lo: ``i * step``, at most ``span`` = hi - lo (uint32)."""
    return tl.minimum(i * step, span)


@triton.jit
def _word_counts(key, lo, span, step, P: tl.constexpr):
    """Per key, int32: (key >= threshold 2P + 1) + (key >= threshold 2P + 2) << 16; summed over a row of
    <= 16384 keys, the two counts of one word (no carry)."""
    at_a = key >= lo + _offset(span, step, 2 * P + 1)
    at_b = key >= lo + _offset(span, step, 2 * P + 2)
    return at_a.to(tl.int32) + (at_b.to(tl.int32) << 16)


@triton.jit
def _kth_largest_key_multi(key, N, K, EARLY: tl.constexpr, M: tl.constexpr, BMAX: tl.constexpr):
    """The K-th largest of a row's N keys (uint32, unsigned order = the floats' order; 1 <= K <= N <= 16384;
    entries past the row hold 0) by an (M + 1)-way search, M = 2, 4 or 8 thresholds counted per round:
    (kth, need, rounds) such that the K are the keys > kth and the first ``need`` of the keys == kth (with
    EARLY possibly a kth below the K-th largest key, as in ``_kth_largest_key``, with ``need`` >= the keys
    equal to it).

    The bracket [lo, hi] (uint32, so its arithmetic never wraps): ``c_lo`` = #keys >= lo >= K > ``c_up``
    = #keys > hi. The first round takes the least key above -inf, the largest below +inf, and the counts
    of the keys > +inf (NaNs), >= +inf, > -inf and >= -inf (a min, a max and two sums of two 16-bit
    counts), so a row's +inf (forced pages) and -inf (padding) do not stretch the bracket: it starts as
    the finite keys' [min, max] unless the K-th key is +-inf (then it is found at once, NaNs aside). Each
    further round counts the keys at or above M thresholds ``lo + i * step`` (step = (hi - lo) // (M + 1)
    + 1, the last ones clamped to hi), two per int32 word, M / 2 sums of one word each (independent:
    their latencies overlap; an int64 word of four counts spilled registers at 16384 keys per row in a
    trial sm_90 compile), and keeps the part that holds the K-th key. It ends when lo = hi (the K-th key) or, EARLY, when exactly K keys are
    >= lo; either way need = K - c_up (no count of the keys above kth after it). BMAX: it also ends when
    c_up = K - 1 (one key of the K is left in the bracket: the largest key <= hi, found by one max
    reduction instead of further rounds; need = 1)."""
    KINF: tl.constexpr = 0xFF800000  # the key of +inf (positive NaNs above it)
    KNINF: tl.constexpr = 0x007FFFFF  # the key of -inf (negative NaNs below it)
    fmn = tl.min(tl.where(key > KNINF, key, 0xFFFFFFFF), 0)  # least key above -inf
    fmx = tl.max(tl.where(key < KINF, key, 0), 0)  # largest key below +inf
    cnt_hi = tl.sum((key > KINF).to(tl.int32) + ((key >= KINF).to(tl.int32) << 16), 0)
    cnt_lo = tl.sum((key > KNINF).to(tl.int32) + ((key >= KNINF).to(tl.int32) << 16), 0)
    n_nan = cnt_hi & 0xFFFF  # keys > +inf
    n_top = cnt_hi >> 16  # keys >= +inf
    n_mid = cnt_lo & 0xFFFF  # keys > -inf
    n_bot = cnt_lo >> 16  # keys >= -inf
    # the K-th key among: NaNs above +inf; +inf; finite; -inf; NaNs below -inf
    a = n_nan >= K
    b = n_top >= K
    c = n_mid >= K
    d = n_bot >= K
    lo = tl.where(a, KINF + 1, tl.where(b, KINF, tl.where(c, fmn, tl.where(d, KNINF, 0))))
    hi = tl.where(a, 0xFFFFFFFF, tl.where(b, KINF, tl.where(c, fmx, tl.where(d, KNINF, KNINF - 1))))
    c_lo = tl.where(a, n_nan, tl.where(b, n_top, tl.where(c, n_mid, tl.where(d, n_bot, N))))
    c_up = tl.where(a, 0, tl.where(b, n_nan, tl.where(c, n_top, tl.where(d, n_mid, n_bot))))
    rounds = 1
    go = hi > lo
    if EARLY:
        go = go & (c_lo != K)
    if BMAX:
        go = go & (c_up != K - 1)
    while go:
        span = hi - lo
        step = span // (M + 1) + 1  # thresholds lo + step, lo + 2 step, ... (at most hi)
        tot0 = tl.sum(_word_counts(key, lo, span, step, 0), 0)
        if M >= 4:
            tot1 = tl.sum(_word_counts(key, lo, span, step, 1), 0)
        if M == 8:
            tot2 = tl.sum(_word_counts(key, lo, span, step, 2), 0)
            tot3 = tl.sum(_word_counts(key, lo, span, step, 3), 0)
        # the counts fall as the thresholds rise: the first ``passed`` thresholds have >= K keys at or above
        passed = tl.full([], 0, tl.int32)
        for i in tl.static_range(M):
            if i < 2:
                tot = tot0
            elif i < 4:
                tot = tot1
            elif i < 6:
                tot = tot2
            else:
                tot = tot3
            cnt = (tot >> (16 * (i % 2))) & 0xFFFF
            c_lo = tl.where(cnt >= K, cnt, c_lo)
            c_up = tl.where((cnt < K) & (passed == i), cnt, c_up)
            passed += (cnt >= K).to(tl.int32)
        below = passed.to(tl.uint32)  # thresholds [below] and [below + 1] bound the K-th key
        hi = tl.where(passed < M, lo + _offset(span, step, below + 1) - 1, hi)
        lo = tl.where(passed > 0, lo + _offset(span, step, below), lo)
        rounds += 1
        go = hi > lo
        if EARLY:
            go = go & (c_lo != K)
        if BMAX:
            go = go & (c_up != K - 1)
    if BMAX:
        last = (hi > lo) & (c_up == K - 1)
        if EARLY:
            last = last & (c_lo != K)
        if last:  # the K-th key: the largest <= hi (keys past the row are 0, below every bracket's lo > 0)
            lo = tl.max(tl.where(key <= hi, key, 0), 0)
            rounds += 1
    return lo, K - c_up, rounds


@triton.jit
def _store_topk(x, ok, offs, N, K, OUT, EARLY: tl.constexpr, THRESHOLDS: tl.constexpr, BMAX: tl.constexpr):
    """Write the positions ``offs`` of the K largest of x where ``ok`` (the first N) to OUT[0..K),
    ascending (ties at the K-th value: the lowest positions); one scan places them. The K-th value by
    ``_kth_largest_key_multi`` with THRESHOLDS per round, or THRESHOLDS = 0 the 3-way
    ``_kth_largest_key`` and a count of the keys above it (EARLY: as there). Returns the search's rounds
    (reductions before the scan)."""
    key = _order_key(x)
    if THRESHOLDS == 0:
        kth, rounds = _kth_largest_key(key, ok, K, EARLY)  # (EARLY: possibly a threshold below the K-th key)
        need = K - tl.sum((ok & (key > kth)).to(tl.int32), 0)
        rounds += 2  # (the extremes; the count above)
    else:  # unsigned keys, those past the row 0 (never >= a threshold: each lies above a key of the row)
        key = tl.where(ok, key.to(tl.uint32, bitcast=True) ^ 0x80000000, 0)
        kth, need, rounds = _kth_largest_key_multi(key, N, K, EARLY, THRESHOLDS, BMAX)
    greater = ok & (key > kth)
    equal = ok & (key == kth)
    cs = tl.cumsum(greater.to(tl.int32) + (equal.to(tl.int32) << 16), 0)  # row <= 32767: no carry
    cg = cs & 0xFFFF
    ce = cs >> 16
    take = greater | (equal & (ce <= need))
    pos = cg + tl.minimum(ce, need) - 1
    tl.store(OUT + pos, offs, mask=take)
    return rounds


@triton.jit
def page_select_kernel(
    Q, K, KMASK, KMAX, KMIN, SCORES, IDX, CNT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_sb, stride_sh, stride_sp, stride_mb,
    H_KV, N_Q, N_K, N_PAGES, HEAD_D, FIRST_UPDATE, FIRST_FORCED, KEEP,
    GROUP: tl.constexpr, PAGE: tl.constexpr, REDUCE_MAX: tl.constexpr, HAS_KMASK: tl.constexpr,
    SELECT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    LEAN: tl.constexpr, EARLY: tl.constexpr, THRESHOLDS: tl.constexpr, BMAX: tl.constexpr, TILES: tl.constexpr,
    STAGES: tl.constexpr, LAST_FIRST: tl.constexpr,
):  # fmt: skip
    if LAST_FIRST:  # grid (B * H_KV, blocks): every row's last block (its update) scheduled first
        bh = tl.program_id(0)
        pb = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pb = tl.program_id(0)
        bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = bh % H_KV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    s_base = b * stride_sb + hk.to(tl.int64) * stride_sh

    # (1) summaries of the pages this step changed (a decode step: the last page)
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    offs_t = tl.arange(0, PAGE)
    span: tl.constexpr = BLOCK_P * TILES
    for pg in range(tl.maximum(FIRST_UPDATE, pb * span), tl.minimum(N_PAGES, (pb + 1) * span)):
        tok = pg * PAGE + offs_t
        t_ok = tok < N_K
        if HAS_KMASK:
            t_ok = t_ok & (tl.load(KMASK + b * stride_mb + tok, mask=t_ok, other=0) > 0)
        kt = tl.load(
            k_base + tok[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        kt = kt.to(tl.float32)
        mx = tl.max(tl.where(t_ok[:, None], kt, float("-inf")), 0)
        mn = tl.min(tl.where(t_ok[:, None], kt, float("inf")), 0)
        row = s_base + pg * stride_sp + offs_d
        tl.store(KMAX + row, mx.to(KMAX.dtype.element_ty), mask=d_ok)
        tl.store(KMIN + row, mn.to(KMIN.dtype.element_ty), mask=d_ok)
    tl.debug_barrier()  # this program's summary writes before its reads below

    # (2) Quest bounds of this program's pages (TILES tiles of BLOCK_P pages, a pipelined loop), reduced
    # over the group's query rows
    if DOT:  # the group's query rows, split by sign: relu(q) and min(q, 0), once per program
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP * N_Q
        heads = hk * GROUP + rows // N_Q
        q_ptr = (
            Q + b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + (rows % N_Q)[:, None] * stride_qn
        )
        qt = tl.load(q_ptr + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qf = qt.to(tl.float32)  # (signs compared in fp32: exact, and right in the interpreter too)
        q_pos = tl.where(qf > 0, qf, 0.0).to(qt.dtype)
        q_neg = tl.where(qf > 0, 0.0, qf).to(qt.dtype)
    row_base = bh.to(tl.int64) * N_PAGES
    for t in tl.range(0, TILES, num_stages=STAGES):
        pages = (pb * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = pages < N_PAGES
        off = s_base + pages[:, None].to(tl.int64) * stride_sp + offs_d[None, :]
        msk = p_ok[:, None] & d_ok[None, :]
        if DOT and LEAN:  # the summaries go from memory straight into the products (no fp32 copy)
            hi = tl.load(KMAX + off, mask=msk, other=0.0)
            lo = tl.load(KMIN + off, mask=msk, other=0.0)
            u2 = _dot(q_pos, tl.trans(hi), DOT_PREC, UPCAST) + _dot(q_neg, tl.trans(lo), DOT_PREC, UPCAST)
            # a page of padding only (max -inf < min +inf in every channel, so channel 0 tells) may give
            # NaN (0 * inf) or -inf in its column: replaced before the rows are combined
            col0 = s_base + pages.to(tl.int64) * stride_sp
            c0_max = tl.load(KMAX + col0, mask=p_ok, other=0.0).to(tl.float32)  # (fp32: the interpreter
            c0_min = tl.load(KMIN + col0, mask=p_ok, other=0.0).to(tl.float32)  # compares bf16 as bits)
            real = c0_max >= c0_min
            u2 = tl.where(real[None, :] & row_ok[:, None], u2, float("-inf"))
            if REDUCE_MAX:
                best = tl.max(u2, 0)
            else:
                best = tl.sum(tl.where(row_ok[:, None], u2, 0.0), 0) / (GROUP * N_Q)
        else:
            kmax = tl.load(KMAX + off, mask=msk, other=0.0).to(tl.float32)
            kmin = tl.load(KMIN + off, mask=msk, other=0.0).to(tl.float32)
            real = tl.max(tl.where(d_ok[None, :], kmax, float("-inf")), 1) >= tl.min(
                tl.where(d_ok[None, :], kmin, float("inf")), 1
            )
            if DOT:  # the bound as two products: relu(q) . kmax + min(q, 0) . kmin, every query row at once
                hi = tl.where(real[:, None], kmax, 0.0).to(qt.dtype)  # padding-only pages: no 0 * inf
                lo = tl.where(real[:, None], kmin, 0.0).to(qt.dtype)
                u2 = _dot(q_pos, tl.trans(hi), DOT_PREC, UPCAST) + _dot(q_neg, tl.trans(lo), DOT_PREC, UPCAST)
                if REDUCE_MAX:
                    best = tl.max(tl.where(row_ok[:, None], u2, float("-inf")), 0)
                else:
                    best = tl.sum(tl.where(row_ok[:, None], u2, 0.0), 0) / (GROUP * N_Q)
            else:  # elementwise, one query row at a time
                best = _elementwise_bound(Q + b * stride_qb, stride_qh, stride_qn, hk, N_Q, offs_d, d_ok, kmax,
                                          kmin, GROUP, REDUCE_MAX, BLOCK_P)  # fmt: skip
        best = tl.where(real, best, float("-inf"))
        best = tl.where(pages >= FIRST_FORCED, float("inf"), best)
        tl.store(SCORES + row_base + pages, best, mask=p_ok)

    # (3) the row's last program to finish takes the row's top KEEP
    if SELECT:
        tl.debug_barrier()  # every thread's score stores before the release below
        done = tl.atomic_add(CNT + bh, 1, sem="acq_rel")
        if done == tl.num_programs(1 if LAST_FIRST else 0) - 1:  # (the row's blocks)
            offs = tl.arange(0, BLOCK_ROW)
            ok = offs < N_PAGES
            x = tl.load(SCORES + row_base + offs, mask=ok, other=0.0, cache_modifier=".cg")
            _store_topk(x, ok, offs, N_PAGES, KEEP, IDX + bh.to(tl.int64) * KEEP, EARLY, THRESHOLDS, BMAX)
            tl.atomic_xchg(CNT + bh, 0)
