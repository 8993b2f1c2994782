"""One Triton pass of the block selection rule (``naive.select_blocks_naive`` with ``mass`` = 0)."""

import triton
import triton.language as tl

#: the key of a tile already taken: below every (order key << 32) + column key
TAKEN = tl.constexpr(-9223372036854775807)


@triton.jit
def block_select_kernel(
    S, FULL, PARTIAL,
    R, NQB, NKB, N_Q, N_K, OFFSET, BLOCK, K,
    CAUSAL: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr, SPAN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Grid: (cdiv(R, ROWS),); ROWS rows of the (R = B * H * NQB, NKB) fp32 scores per program, the row's
    query block ``r % NQB``. Each tile gets one int64 key, (an order-preserving int32 image of its ranked
    score) << 32 plus (BLOCK_L - 1 - column): the keys of a row are distinct, their order is the ranked
    scores' with ties to the lowest column, and one max-reduction per round takes the next tile, K rounds
    (K + SPAN: SPAN is 1 when the local span of a query block may hold two key blocks, OFFSET not a
    multiple of BLOCK; a row takes K tiles plus its span's uncounted one, as the rule's budget says).
    Writes uint8 FULL / PARTIAL (R, NKB)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    valid = in_rows[:, None] & (cols[None, :] < NKB)
    offs = rows.to(tl.int64)[:, None] * NKB + cols[None, :]
    s = tl.load(S + offs, mask=valid, other=float("-inf"))
    i = rows % NQB
    q_first = i * BLOCK + OFFSET
    q_last = tl.minimum((i + 1) * BLOCK, N_Q) - 1 + OFFSET
    k_first = cols * BLOCK
    k_last = tl.minimum(k_first + BLOCK, N_K) - 1
    allowed = valid
    if CAUSAL:
        allowed = allowed & (k_first[None, :] <= q_last[:, None])
    s = tl.where(allowed, s, float("-inf"))
    forced = tl.zeros([ROWS, BLOCK_L], dtype=tl.int1)
    counted = tl.zeros([ROWS, BLOCK_L], dtype=tl.int1)  # the forced tiles the budget counts
    if SINK:
        forced = forced | (cols[None, :] == 0)
        counted = counted | (cols[None, :] == 0)
    if LOCAL:
        # the diagonal span: the key blocks of the query block's first to last position
        local_first = tl.minimum(tl.maximum(q_first, 0), N_K - 1) // BLOCK
        local = tl.minimum(tl.maximum(q_last, 0), N_K - 1) // BLOCK
        forced = forced | ((cols[None, :] >= local_first[:, None]) & (cols[None, :] <= local[:, None]))
        counted = counted | (cols[None, :] == local[:, None])
    forced = forced & allowed
    counted = counted & allowed
    budget = K + tl.sum(forced.to(tl.int32), 1) - tl.sum(counted.to(tl.int32), 1)  # (ROWS,)
    ranked = tl.where(forced, float("inf"), s)
    bits = (ranked + 0.0).to(tl.int32, bitcast=True)  # (-0 + 0 = +0: one key for both zeros)
    bits = tl.where(ranked != ranked, 0x7FFFFFFF, bits)  # every NaN ranks highest, as in torch.topk
    okey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (okey.to(tl.int64) << 32) + (BLOCK_L - 1 - cols[None, :]).to(tl.int64)
    keep = tl.zeros([ROWS, BLOCK_L], dtype=tl.int1)
    for t in range(K + SPAN):
        top = tl.max(key, 1)
        hit = (key == top[:, None]) & (t < budget)[:, None]
        keep = keep | hit
        key = tl.where(hit, TAKEN, key)
    finite = (s == s) & (tl.abs(s) < float("inf"))
    keep = keep & ((allowed & finite) | forced)
    if CAUSAL:
        whole = k_last[None, :] <= q_first[:, None]
        tl.store(FULL + offs, (keep & whole).to(tl.uint8), mask=valid)
        tl.store(PARTIAL + offs, (keep & ~whole).to(tl.uint8), mask=valid)
    else:
        tl.store(FULL + offs, keep.to(tl.uint8), mask=valid)
        tl.store(PARTIAL + offs, tl.zeros([ROWS, BLOCK_L], dtype=tl.uint8), mask=valid)
