"""dQ by reduction, for the executor's one-pass backward (the dK/dV kernel with ``FUSED_DQ``).

The dK/dV kernel visits every (key tile, query tile) pair of the plan; with FUSED_DQ it also adds each pair's
``dS K`` (BLOCK_M x D, unscaled) into a float32 buffer DQA (B * H, N_q, D) that the launcher zeroes, so the
scores and dP are computed once per pair (5 matrix products against 7 for the dK/dV and dQ kernels, which
recompute them). :func:`block_sparse_dq_finish_kernel` then scales and rounds the buffer into dQ.
- DQ_TMA: a tensor-descriptor reduction (Hopper's bulk ``cp.reduce.async.bulk.tensor`` add: one copy-engine
  operation per tile; rows past N_q are dropped by the descriptor's bounds);
- else relaxed element-wise ``atomic_add`` (any GPU; Triton's CPU interpreter, which has no descriptor
  reductions).

The additions run in an order the scheduler decides, so dQ is not bitwise reproducible from run to run; dK and
dV are. Measured on the H100: not faster than the two kernels (benchmarks/results/h100-2026-11-25-s18/fused_bwd).
"""

import triton
import triton.language as tl

from attnlab.kernels.block_sparse.common import head_rows, head_tile, rounded


@triton.jit
def dq_target(DQA, row_base, N_Q, HEAD_D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DQ_TMA: tl.constexpr):
    """Where one head's dQ tiles are added (its rows start at ``row_base``): a tensor descriptor (DQ_TMA) or
    the base pointer."""
    base = DQA + row_base * HEAD_D
    if DQ_TMA:
        return tl.make_tensor_descriptor(base, shape=[N_Q, HEAD_D], strides=[HEAD_D, 1],
                                         block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
    else:
        return base


@triton.jit
def add_dq(dqa, ds_t, k, start_m, N_Q, HEAD_D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
           DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DQ_TMA: tl.constexpr):  # fmt: skip
    """Adds ds_t^T k (query rows [start_m, start_m + BLOCK_M), unscaled) at :func:`dq_target`'s ``dqa``."""
    if UPCAST:
        dq = tl.dot(tl.trans(ds_t), k.to(tl.float32), input_precision="ieee")
    else:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC)
    if DQ_TMA:
        dqa.atomic_add([start_m, 0], dq)
    else:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = dqa + offs_m[:, None].to(tl.int64) * HEAD_D + offs_d[None, :]
        tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D), sem="relaxed")


@triton.jit
def block_sparse_dq_finish_kernel(DQA, DQ, stride_dqb, stride_dqh, stride_dqn, H, N_Q, HEAD_D, scale,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """DQ = scale * DQA rounded to DQ's dtype; grid (cdiv(N_q, BLOCK_M), B * H), DQA (B * H, N_q, HEAD_D)."""
    b, h, offs_m, offs_d, m = head_tile(H, N_Q, HEAD_D, BLOCK_M, BLOCK_D)
    acc = tl.load(DQA + ((b * H + h) * N_Q + offs_m[:, None]) * HEAD_D + offs_d[None, :], mask=m, other=0.0)
    tl.store(head_rows(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, offs_m, offs_d),
             rounded(acc * scale, DQ.dtype.element_ty, UPCAST), mask=m)  # fmt: skip
