"""Recycled Attention's full-step scores from the decode kernel's own logits in one launch (Triton): the
attention weights' maximum over each KV group's query rows, max-pooled over key positions, padding masked.

``recycled_scores(logits, lse, h_kv, pool, valid) -> (B, H_kv, N_k) float32``::

    m[b, j, t]     = max over the group's rows r (heads j * G .. j * G + G - 1, queries 0 .. N_q - 1) of
                     logits[b, h_r, i_r, t] - lse'[b, h_r, i_r]         (lse' = lse, or 0 where not finite)
    p[b, j, t]     = exp(m[b, j, t])                                    (exp(-inf) = 0)
    out[b, j, t]   = max of p[b, j, t + d] over d in [-pool // 2, pool // 2] with 0 <= t + d < N_k
                     (max_pool1d's implicit -inf padding: positions outside the cache take no part)
    out[b, j, t]   = -inf where valid[b, t] is False

A row with no allowed key (lse -inf) has only -inf logits: it adds 0 (``exp(-inf)``), never NaN. This is
``attnlab.catalog.decode.recycled``'s PyTorch post-processing of
:func:`attnlab.catalog.decode._common.attend_with_logits` (``_scores_torch``), in one pass over the logits
instead of a subtraction into a temporary of their size, a reduction, exp, max_pool1d and masked_fill.

``recycled_scores_kernel``. Grid: (cdiv(N_k, BLOCK), B * H_kv). Program (nb, b * H_kv + j) owns the
BLOCK positions [nb * BLOCK, nb * BLOCK + BLOCK) of (b, j). For each of the group's G * N_q rows (a
runtime loop; row r: head ``j * G + r // N_q``, query ``r % N_q``, as the decode kernels order them) it
loads the row's logits at the positions shifted by each d of the pooling window (a static loop over
``POOL`` shifts: the block plus a halo of pool // 2 positions each side; loads outside [0, N_k) give
-inf; the shifted loads after the first hit the cache), keeps their running maximum minus the row's lse,
and finally takes exp and masks padding. The maxima over rows and over the window commute, and exp is
increasing, so ``exp(max)`` is the pooled maximum of the exps (the same float: ``fl(x - c)`` is monotone in
x). Near the bound of the logits read once from memory (B * H * N_q * N_k fp32): see SCORES_BLOCK.
Importing this module registers ``attnlab::recycled_scores`` (a fake-tensor rule: opaque to
``torch.compile``; no host synchronisation, so a step built on it can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.kernels.triton_utils import interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernel then takes CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: Key positions per program, and warps per program: two positions per thread (each loads them POOL
#: times per row, at unaligned shifts, so fewer registers in flight beat wider tiles). Measured on the H100
#: (32:8 heads, N_k = 128K, pool 7, N_q = 1, in a CUDA graph), without / with a validity mask, B=1 and B=8:
#: 256 x 4 warps 9.2 / 9.5 us and 63.7 / 69.4 us (512 x 8 and 128 x 2 the same within 2%; 1024 x 4:
#: 14.3 / 25.9 and 96 / 182 us; pool 1 reads the logits in 4.9 and 56.7 us; the PyTorch ops it replaces
#: 48 / 57 and 311 / 368 us). N_q = 4, B=1: 44 us (pool 1: 27).
SCORES_BLOCK = 256
SCORES_WARPS = 4
#: The widest pool this kernel takes: it unrolls the window's POOL shifts (compile time and code size grow
#: with it; a bound chosen for that, not measured); recycled's wider pools take the PyTorch path.
MAX_POOL = 63


@triton.jit
def recycled_scores_kernel(
    LOGITS, LSE, VALID, OUT,
    stride_lb, stride_lh, stride_ln,
    stride_sb, stride_sh, stride_sn,
    stride_vb,
    H_KV, N_Q, N_K,
    GROUP: tl.constexpr, POOL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    nb = tl.program_id(0)
    bj = tl.program_id(1)
    b = (bj // H_KV).to(tl.int64)
    j = bj % H_KV
    offs = nb * BLOCK + tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for r in range(GROUP * N_Q):
        head = (j * GROUP + r // N_Q).to(tl.int64)
        qi = r % N_Q
        lse = tl.load(LSE + b * stride_sb + head * stride_sh + qi * stride_sn)
        lse = tl.where((lse > float("-inf")) & (lse < float("inf")), lse, 0.0)  # (not finite, NaN too: 0)
        row = LOGITS + b * stride_lb + head * stride_lh + qi * stride_ln
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for d in tl.static_range(POOL):  # the window's shifts: the block and its halo of POOL // 2 each side
            t = offs + (d - POOL // 2)
            x = tl.load(row + t, mask=(t >= 0) & (t < N_K), other=float("-inf"))
            m = tl.maximum(m, x)
        best = tl.maximum(best, m - lse)
    score = tl.exp(best)  # (exp(-inf) = 0: a window of rows with no allowed key)
    ok = offs < N_K
    if HAS_VALID:
        real = tl.load(VALID + b * stride_vb + offs, mask=ok, other=0) != 0
        score = tl.where(real, score, float("-inf"))
    tl.store(OUT + bj.to(tl.int64) * N_K + offs, score, mask=ok)


def recycled_scores_launch(
    logits: Tensor, lse: Tensor, h_kv: int, pool: int, valid: Tensor | None, block: int
) -> Tensor:
    """:func:`recycled_scores` through the Triton kernel (one launch)."""
    if logits.dim() != 4 or lse.shape != logits.shape[:3] or h_kv < 1 or logits.shape[1] % h_kv:
        raise ValueError(
            f"recycled_scores: logits {tuple(logits.shape)} must be (B, H, N_q, N_k) with lse "
            f"{tuple(lse.shape)} (B, H, N_q) and H % h_kv == 0 (h_kv={h_kv})"
        )
    if pool < 1 or pool % 2 == 0 or pool > MAX_POOL:
        raise ValueError(
            f"recycled_scores: pool must be an odd width from 1 to MAX_POOL = {MAX_POOL} (the kernel unrolls "
            f"it), got {pool}"
        )
    b, h, n_q, n_k = logits.shape
    if valid is not None and (valid.shape != (b, n_k) or valid.device != logits.device):
        raise ValueError(
            f"recycled_scores: valid {tuple(valid.shape)} must be (B, N_k) = ({b}, {n_k}) on {logits.device}"
        )
    out = torch.empty(b, h_kv, n_k, device=logits.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if n_q == 0:  # (no rows: every weight 0)
        out.zero_()
        return out if valid is None else out.masked_fill_(~valid.bool()[:, None], float("-inf"))
    if logits.dtype != torch.float32:
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if lse.dtype != torch.float32:
        lse = lse.float()
    vmask = out
    if valid is not None:
        vmask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid  # (the same bytes: no copy)
        if vmask.stride(-1) != 1:
            vmask = vmask.contiguous()
    ls, ss = logits.stride(), lse.stride()
    recycled_scores_kernel[(triton.cdiv(n_k, block), b * h_kv)](
        logits, lse, vmask, out,
        ls[0], ls[1], ls[2],
        ss[0], ss[1], ss[2],
        vmask.stride(0) if valid is not None else 0,
        h_kv, n_q, n_k,
        GROUP=h // h_kv, POOL=int(pool), HAS_VALID=valid is not None, BLOCK=int(block),
        num_warps=SCORES_WARPS,
    )  # fmt: skip
    return out


@torch.library.custom_op("attnlab::recycled_scores", mutates_args=())
def recycled_scores_op(
    logits: Tensor, lse: Tensor, h_kv: int, pool: int, valid: Tensor | None, block: int
) -> Tensor:
    return recycled_scores_launch(logits, lse, h_kv, pool, valid, block)


@recycled_scores_op.register_fake
def _(logits: Tensor, lse: Tensor, h_kv: int, pool: int, valid: Tensor | None, block: int) -> Tensor:
    return logits.new_empty((logits.shape[0], h_kv, logits.shape[3]), dtype=torch.float32)


def recycled_scores(
    logits: Tensor,
    lse: Tensor,
    h_kv: int,
    pool: int,
    valid: Tensor | None,
    *,
    block: int | None = None,
) -> Tensor:
    """(B, H_kv, N_k) float32: each token's attention weight ``exp(logits - lse)`` (lse replaced by 0 where
    not finite; a row with no allowed key, its logits all -inf, gives 0), max over its KV group's G * N_q
    query rows (heads ``j * G .. j * G + G - 1``, G = H // H_kv), max-pooled over the ``pool`` (odd)
    positions centred on it (positions outside [0, N_k) take no part, as max_pool1d's -inf padding; 1 =
    none), and -inf where ``valid`` (B, N_k) bool is False (module docstring). ``logits`` (B, H, N_q, N_k)
    float32 with any strides but a contiguous last dim (a slice ``[..., :N_k]`` of a wider buffer is read in
    place), ``lse`` (B, H, N_q) float32. ``block``: positions per program (default ``SCORES_BLOCK``; a
    power of 2). One launch, no host synchronisation; through the custom op ``attnlab::recycled_scores``
    inside ``torch.compile`` (opaque to it, shapes from the input shapes), the launcher directly otherwise."""
    block = SCORES_BLOCK if block is None else int(block)
    if torch.compiler.is_compiling():
        return recycled_scores_op(logits, lse, int(h_kv), int(pool), valid, block)
    return recycled_scores_launch(logits, lse, int(h_kv), int(pool), valid, block)
