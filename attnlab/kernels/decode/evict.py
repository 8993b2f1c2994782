"""H2O's per-step eviction of one token in one launch (Triton): the step's attention weights from the decode
kernel's own logits, the running scores, the rank, and the kept set without the lowest-ranked candidate.

``h2o_evict_one(logits, lse, cand, prev_score, prev_seen, key_mask, *, recent, normalize)`` for a
per-step call whose C = budget + 1 candidates (the K = budget kept tokens, then the one appended) lose one:

    w[e]    = (1 / G) * sum over the group's G query heads h and the N_q queries i of exp(logits[h, i, e] - lse[h, i])
    n[e]    = number of queries i with logits[h0, i, e] > -inf (h0: the group's first head)
    acc[e]  = prev_score[e] + w[e]  (e < K; w[e] for the appended ones)
    seen[e] = prev_seen[e] + n[e]   (likewise)
    rank[e] = acc / max(seen, 1) if normalize else acc; +inf for the last ``recent``; -inf for padding
    drop the first e with the lowest rank; keep the others in their order

(``attnlab.catalog.decode.h2o``'s rule with one eviction: ``evict_step(..., fast=True)`` drops the argmin,
ties to the first). Rows whose lse is -inf (no allowed candidate) add 0. Grid: (B * H_kv,): one program
per (batch, KV head) walks its C candidates twice in blocks (the minimum, then the compaction, recomputing
the same values). ``h2o_evict_one_naive`` is the same in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.kernels.triton_utils import interpreting

IMPORTED_INTERPRETED = interpreting()
#: Candidates per block of a program's walk, and warps per program. Measured on the H100 (d02bba7, h2o per
#: step at 128K, budget 4096, the step in a CUDA graph; h100-2026-11-24-s14): 1024 x 4 warps B=1 55.6 /
#: 55.9 us, B=8 114.7 / 114.6; 4096 x 8: 53.7 / 54.0, 113.9 / 113.1; 2048 x 8: 48.5 / 48.1, 107.9 / 106.4.
EVICT_BLOCK = 2048
EVICT_WARPS = 8


@triton.jit
def _step_values(
    LOGITS, LSE, CAND, PREV_SCORE, PREV_SEEN, KMASK, bh, b, e, ok,
    C, K, RECENT, N_Q, stride_mb,
    GROUP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KMASK: tl.constexpr,
):  # fmt: skip
    """(acc, seen, rank, cand) of candidates ``e`` of row ``bh`` (see the module docstring)."""
    w = tl.zeros(e.shape, tl.float32)
    n = tl.zeros(e.shape, tl.float32)
    for r in range(GROUP * N_Q):
        row = bh * GROUP * N_Q + r  # (B, H, N_Q) flattened: head bh * GROUP + r // N_Q, query r % N_Q
        lse = tl.load(LSE + row)
        lg = tl.load(LOGITS + row.to(tl.int64) * C + e, mask=ok, other=float("-inf"))
        lse_safe = tl.where(lse > float("-inf"), lse, float("inf"))  # (no allowed candidate: adds 0)
        p = tl.where(lg > float("-inf"), tl.exp(lg - lse_safe), 0.0)
        w += p
        if r < N_Q:  # the group's first head: the queries that see each candidate
            n += tl.where(lg > float("-inf"), 1.0, 0.0)
    old = ok & (e < K)
    acc = w / GROUP + tl.load(PREV_SCORE + bh.to(tl.int64) * K + e, mask=old, other=0.0)
    seen = n + tl.load(PREV_SEEN + bh.to(tl.int64) * K + e, mask=old, other=0.0)
    if NORMALIZE:  # noqa: SIM108 (constexpr branches)
        rank = acc / tl.maximum(seen, 1.0)
    else:
        rank = acc
    rank = tl.where(e >= C - RECENT, float("inf"), rank)
    cand = tl.load(CAND + bh.to(tl.int64) * C + e, mask=ok, other=0)
    if HAS_KMASK:
        real = tl.load(KMASK + b * stride_mb + cand, mask=ok, other=1) > 0
        rank = tl.where(real, rank, float("-inf"))
    return acc, seen, rank, cand


@triton.jit
def h2o_evict_one_kernel(
    LOGITS, LSE, CAND, PREV_SCORE, PREV_SEEN, KMASK, KEPT, SCORE, SEEN,
    H_KV, C, K, RECENT, N_Q, stride_mb,
    GROUP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // H_KV).to(tl.int64)
    best = float("inf")
    best_e = C  # (no candidate: nothing dropped; C > K always here)
    for e0 in range(0, C, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        ok = e < C
        _, _, rank, _ = _step_values(LOGITS, LSE, CAND, PREV_SCORE, PREV_SEEN, KMASK, bh, b, e, ok,
                                     C, K, RECENT, N_Q, stride_mb, GROUP, NORMALIZE, HAS_KMASK)  # fmt: skip
        rank = tl.where(ok, rank, float("inf"))
        low = tl.min(rank, 0)
        at = tl.min(tl.where(rank == low, e, C), 0)  # (ties: the first)
        take = low < best
        best_e = tl.where(take, at, best_e)
        best = tl.where(take, low, best)
    budget = C - 1
    for e0 in range(0, C, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        ok = e < C
        acc, seen, _, cand = _step_values(LOGITS, LSE, CAND, PREV_SCORE, PREV_SEEN, KMASK, bh, b, e, ok,
                                          C, K, RECENT, N_Q, stride_mb, GROUP, NORMALIZE, HAS_KMASK)  # fmt: skip
        keep = ok & (e != best_e)
        dest = bh.to(tl.int64) * budget + tl.where(e > best_e, e - 1, e)
        tl.store(KEPT + dest, cand, mask=keep)
        tl.store(SCORE + dest, acc, mask=keep)
        tl.store(SEEN + dest, seen, mask=keep)


def h2o_evict_one(
    logits: Tensor,
    lse: Tensor,
    cand: Tensor,
    prev_score: Tensor,
    prev_seen: Tensor,
    key_mask: Tensor | None,
    *,
    recent: int,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(kept (B, H_kv, C - 1) int32, score, seen float32): the module docstring's step. ``logits`` (B, H, N_q,
    C) and ``lse`` (B, H, N_q) float32 from :func:`attnlab.kernels.decode.op.decode_attention_logits` over
    ``cand`` (B, H_kv, C) int32; ``prev_score`` / ``prev_seen`` (B, H_kv, K) float32 with K < C."""
    b, h, n_q, c = logits.shape
    h_kv, k_prev = cand.shape[1], prev_score.shape[2]
    if cand.shape != (b, h_kv, c) or prev_seen.shape != prev_score.shape or k_prev >= c:
        raise ValueError(
            f"h2o_evict_one: cand {tuple(cand.shape)} must be (B, H_kv, C) = ({b}, {h_kv}, {c}) and the "
            f"previous scores {tuple(prev_score.shape)} (B, H_kv, K < C)"
        )
    if cand.dtype != torch.int32 or not cand.is_contiguous():  # (host time: no no-op copies)
        cand = cand.to(torch.int32).contiguous()
    if prev_score.dtype != torch.float32 or not prev_score.is_contiguous():
        prev_score = prev_score.float().contiguous()
    if prev_seen.dtype != torch.float32 or not prev_seen.is_contiguous():
        prev_seen = prev_seen.float().contiguous()
    if not logits.is_contiguous():
        logits = logits.contiguous()
    if not lse.is_contiguous():
        lse = lse.contiguous()
    kept = torch.empty(b, h_kv, c - 1, device=cand.device, dtype=torch.int32)
    score = torch.empty(b, h_kv, c - 1, device=cand.device, dtype=torch.float32)
    seen = torch.empty_like(score)
    kmask = cand if key_mask is None else (key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous())
    h2o_evict_one_kernel[(b * h_kv,)](
        logits, lse, cand, prev_score, prev_seen, kmask, kept, score, seen,
        h_kv, c, k_prev, int(recent), n_q, kmask.stride(0) if key_mask is not None else 0,
        GROUP=h // h_kv, NORMALIZE=bool(normalize), HAS_KMASK=key_mask is not None,
        BLOCK=min(EVICT_BLOCK, max(16, triton.next_power_of_2(c))), num_warps=EVICT_WARPS,
    )  # fmt: skip
    return kept, score, seen


def h2o_evict_one_naive(
    logits: Tensor,
    lse: Tensor,
    cand: Tensor,
    prev_score: Tensor,
    prev_seen: Tensor,
    key_mask: Tensor | None,
    *,
    recent: int,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`h2o_evict_one` in PyTorch (the twin the tests compare with)."""
    b, h, n_q, c = logits.shape
    h_kv, k_prev = cand.shape[1], prev_score.shape[2]
    safe = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]
    p = torch.where(torch.isfinite(logits), torch.exp(logits - safe), 0.0)
    w = p.sum(2).view(b, h_kv, h // h_kv, c).mean(2)
    n = torch.isfinite(logits.view(b, h_kv, h // h_kv, n_q, c)[:, :, 0]).sum(2).float()
    acc = w + torch.nn.functional.pad(prev_score.float(), (0, c - k_prev))
    seen = n + torch.nn.functional.pad(prev_seen.float(), (0, c - k_prev))
    rank = acc / seen.clamp(min=1) if normalize else acc.clone()
    if recent:
        rank[..., c - recent :] = float("inf")
    if key_mask is not None:
        real = key_mask.gather(1, cand.flatten(1).long()).view(cand.shape) > 0
        rank = rank.masked_fill(~real, float("-inf"))
    drop = rank.argmin(-1, keepdim=True)
    keep = torch.ones_like(rank, dtype=torch.bool).scatter_(2, drop, False)
    kept = cand[keep].view(b, h_kv, c - 1).to(torch.int32)
    return kept, acc[keep].view(b, h_kv, c - 1), seen[keep].view(b, h_kv, c - 1)
