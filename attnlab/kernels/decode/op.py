"""Launchers and ``torch.library`` custom ops of the decode kernels (fwd.py).

- ``decode_attention(q, k, v, index, count, page, scale, causal) -> (out, lse)``
  (``attnlab::decode_select_fwd``): attention of a few queries over the selected entries of the cache.
- ``decode_ranges(q, k, v, ranges, scale, causal) -> (out, lse)`` (``attnlab::decode_ranges_fwd``): the
  same over contiguous token runs per row (the whole cache, or sinks + a recent window), no index tensor.
- ``decode_attention_logits(...) -> (out, lse, logits)`` (``attnlab::decode_logits_fwd``): the same with
  the attention's own scores (per query row, or their maximum over each KV group's rows).
- ``page_scores(q, kmax, kmin, n_pages, reduce_max) -> scores`` (``attnlab::page_scores``): Quest's page
  upper bounds per KV group.
- ``page_select(q, k, kmax, kmin, counter, ...) -> (index, scores)`` (``attnlab::page_select``): page_topk's
  whole selection in one launch (summary update of the step's pages, bounds, top pages).
- ``row_topk(x, k) -> positions`` (``attnlab::row_topk``): each row's k largest, ascending.

All are opaque to ``torch.compile`` (fake-tensor rules below), launch no host synchronisation, and
their output shapes depend on input shapes only, so a decode step built from them can be captured in a
CUDA graph. Forward only (decode needs no gradient). Importing this module registers these ops.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from attnlab.kernels.decode.fwd import (
    decode_merge_kernel,
    decode_split_kernel,
    page_score_kernel,
    page_select_kernel,
    row_topk_kernel,
)
from attnlab.kernels.triton_utils import head_block, interpreting, next_power_of_2

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: Key columns per inner step on a GPU (a multiple of the page; pages larger than this take one page).
BLOCK_N = 64
#: Programs the split-K launch aims for per streaming multiprocessor (enough to cover HBM latency).
PROGRAMS_PER_SM = 4
#: The longest run of cache tokens one split-K program reads. Why (H100, 1559cad): one full-cache KV head
#: beside seven 4K-token ones at B=8, 128K, planned by program count alone (9 splits of 14.5K tokens), took
#: 1016 us where its 654 MB need ~220 us at the rate the kernel reached on a dense read (89% of HBM).
#: Measured at c5a93cb (retrieval_heads_kv with 1 of 8 KV heads full at 128K in one launch over token
#: lists, the step in a CUDA graph; h100-2026-11-24-s14): cap 2048 / 1024 / 512 / 256 tokens: B=1 178.6 /
#: 118.2 / 91.8 / 133.6 us, B=8 415.3 / 362.5 / 363.9 / 516.0 us. That step now runs two launches planned
#: for their rows (``active_rows``); the cap still governs lists of unequal counts in one launch (e.g.
#: retrieval heads given as a tensor input). Steps over budget-sized lists (page_topk, 4096 tokens) plan
#: the same splits under 512 as under 2048 (their splits are already shorter).
MAX_SPLIT_TOKENS = 512
#: The shortest split when splits are planned for the rows that read (``active_rows``): one retrieval head's
#: 128K tokens in 528 splits made the merge take 45.7 us (d02bba7, B=1), in 256 splits 4.3 us (3e39899).
MIN_SPLIT_TOKENS = 512
#: Pages per page-score program.
BLOCK_P = 32
#: The split-K kernel loads each inner step's V tile together with its K tile (before the scores) instead of
#: after the softmax. At 128K, budget 4096, B=1 every split is one inner step, so nothing else overlaps
#: the two loads. The same results.
DECODE_EARLY_V = True
#: Warps and software-pipeline stages of the split-K kernel on a GPU. Stages 1 or 2 (at 128K, budget 4096
#: most splits are one inner step): a difference within the noise whose sign flips between runs on the
#: H100, page_topk's step at B=1: 1 stage 48.19 / 47.97 us against 48.88 / 48.61 with 2 at 12f0b1b, but
#: 48.59 / 48.30 against 48.30 / 48.00 at 8ddb357 (h100-2026-11-24-s13/decode_run4/NOTES.md).
DECODE_WARPS = 4
DECODE_STAGES = 1
#: Stages when a split walks more than one inner step over entries smaller than a key tile (token lists:
#: each tile waits for its index load; a loop for the pipeliner to overlap), e.g. a full-cache row of
#: tokens split in pieces of MAX_SPLIT_TOKENS. Measured at c3a6c39 / 3984ea0 (retrieval_heads_kv, 1 of 8
#: KV heads full at 128K, CUDA graph, h100-2026-11-24-s14): 2 stages instead of 1, B=1 81.8 / 81.4
#: against 91.6 / 92.2 us, B=8 318.5 / 320.4 against 360.4 / 361.7 us. Not for whole tiles: every token
#: of 128K in entries of 64 (a full step) took 203.8 us at B=1 with 2 stages (487e1e8), 197.6 with 1.
DECODE_LOOP_STAGES = 2
#: With a ``counter`` from the caller, the split-K kernel merges its partials itself (the last program of
#: each group of rows merges them; ``decode_split_kernel``'s MERGE): one launch per step instead of two.
#: The same results (the same merge arithmetic). Up to ``FUSED_MERGE_MAX_SPLITS`` splits (the merging
#: program holds a (splits, D) tile); more go to the merge launch. Off: measured slower on the H100
#: (617fc77, page_topk's step at 128K, page 16, budget 4096, CUDA graph): B=1 57.6 vs 49.4 us, B=8 176.2
#: vs 171.5 us; the decode kernel alone 27.1 vs 19.4 us at B=1. A graph's kernels start 0.3-0.45 us
#: after the previous one ends, so a launch saves little, while the last program merges its rows one
#: after another (4 at B=1, each a dependent read of 64 partials).
FUSED_MERGE = False
#: Channels per merge program (a row's D channels over D / MERGE_BLOCK_D programs: more programs,
#: each reading a narrower column of the partials; >= 128: one program per row, as up to fae1c67).
MERGE_BLOCK_D = 32  # (a power of two)
FUSED_MERGE_MAX_SPLITS = 64


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _target_programs(q: Tensor) -> int:
    if q.is_cuda:
        return PROGRAMS_PER_SM * _sm_count(q.device.index or 0)
    return 4  # the interpreter: a few splits, so the merge is exercised on tiny shapes


def plan_splits(
    n_entries: int, page: int, outer: int, target: int, *, capped: bool = True
) -> tuple[int, int, int]:
    """(BLOCK_N, entries per split, splits) for ``n_entries`` index entries of ``page`` tokens each and
    ``outer`` = B * H_kv * row blocks programs per split: enough splits to give about ``target`` programs,
    and no split longer than ``MAX_SPLIT_TOKENS`` (index rows of unequal ``count``: a few full-cache rows
    beside short ones must not fall to a few programs; ``capped`` False: rows of equal work, no cap),
    each split a whole number of inner steps."""
    block_n = max(page, 16 if IMPORTED_INTERPRETED else BLOCK_N)
    ent = block_n // page
    steps = max(1, -(-n_entries // ent))
    cap = -(-steps * block_n // MAX_SPLIT_TOKENS) if capped else 1
    splits = max(1, min(steps, max(cap, -(-target // max(outer, 1)))))
    if not capped:  # (and none shorter than MIN_SPLIT_TOKENS: the merge of many splits costs more)
        splits = max(1, min(splits, -(-steps * block_n // MIN_SPLIT_TOKENS)))
    per_split = -(-steps // splits) * ent
    splits = max(1, -(-n_entries // per_split))
    return block_n, per_split, splits


class Ranges(NamedTuple):
    """Per-row token runs of the split kernel's RANGES mode (``fwd.py``): ``full`` (B or 1, H_kv) bool or
    int8, non-zero where the KV head reads the whole cache; ``first`` (B,) integer, each sequence's first
    real token, or None for 0; the other rows read ``[first, first + sink) + [win, N_k)``."""

    full: Tensor
    first: Tensor | None
    sink: int
    win: int


def _check(q: Tensor, k: Tensor, v: Tensor, index: Tensor, page: int) -> None:
    if page < 1 or page & (page - 1) or page > 256:
        raise ValueError(f"decode kernel: page={page} must be a power of two in [1, 256]")
    if index.dim() != 3 or index.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"decode kernel: index has shape {tuple(index.shape)}; expected (B, H_kv, n) = "
            f"({k.shape[0]}, {k.shape[1]}, n)"
        )
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"decode kernel: needs D_v == D, got D={q.shape[-1]}, D_v={v.shape[-1]}")


def decode_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor | None,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    counter: Tensor | None = None,
    logits: Tensor | None = None,
    active_rows: int | None = None,
    ranges: Ranges | None = None,
) -> tuple[Tensor, Tensor]:
    """Split-K decode over the selected entries (see fwd.py). q (B, H, N_q, D), k/v (B, H_kv, N_k, D) with a
    unit last stride (copied otherwise), index (B, H_kv, n) int32, count (B, H_kv) int32 or None,
    key_mask (B, N_k) (> 0: a real token; any dtype) or None. ``counter``: int32 zeros on q's device, at
    least B * H_kv * (row blocks: GROUP * N_q rows in blocks of up to 64) long, kept by the caller for later
    calls (the kernel leaves them zero): the kernel then merges its splits itself (``FUSED_MERGE``) in one
    launch (a shorter counter: two launches). Calls that share a counter must not run concurrently (other streams).
    ``logits``: a contiguous float32 (B, H, N_q, n * page) tensor that receives each score the kernel
    computes, ``scale * q . k`` at column ``e * page + offset`` of the index list (-inf where the token is
    not allowed; entries at or past ``count`` are left as they were), or a (B, H_kv, n * page) one that
    receives their maximum over each KV group's query rows (GROUP * N_q <= 64), or None.
    ``active_rows``: how many of the B * H_kv index rows have entries, when the caller knows it and the
    others count 0 (e.g. retrieval heads' whole-cache rows in a launch of their own): the splits are
    planned for those rows alone, as rows of equal work.
    ``ranges``: the rows read token runs instead of an index list (:class:`Ranges`; ``index`` and ``count``
    are then ignored, ``page`` must be 1; ``active_rows`` counts the full rows, 0 when there are none:
    the splits are planned for the longest row there can be).
    Returns (out (B, H, N_q, D) in q's dtype, lse (B, H, N_q) float32)."""
    if ranges is not None:
        return _ranges_launch(q, k, v, ranges, scale, causal, key_mask, active_rows)
    if index is None:
        raise ValueError("decode kernel: an index list is needed without ranges")
    _check(q, k, v, index, page)
    # (host time matters at one token per step: one stride() call per tensor, no no-op casts)
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    if qs[-1] != 1:
        q = q.contiguous()
        qs = q.stride()
    if ks[-1] != 1:
        k = k.contiguous()
        ks = k.stride()
    if vs[-1] != 1:
        v = v.contiguous()
        vs = v.stride()
    if index.dtype != torch.int32:
        index = index.to(torch.int32)
    ids = index.stride()
    if ids[-1] != 1:
        index = index.contiguous()
        ids = index.stride()
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    n_rows = group * n_q
    block_m = max(16, min(64, next_power_of_2(n_rows)))
    m_blocks = -(-n_rows // block_m)
    n_idx = index.shape[2]
    rows = b * h_kv if active_rows is None else max(1, active_rows)
    block_n, per_split, splits = plan_splits(
        n_idx, page, rows * m_blocks, _target_programs(q), capped=active_rows is None
    )
    block_d = head_block(d)
    o_part = torch.empty(b * h_kv * splits * n_rows, block_d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b * h_kv * splits * n_rows, device=q.device, dtype=torch.float32)
    cnt = count.to(torch.int32).contiguous() if count is not None else index  # (unused without count)
    if key_mask is not None and (key_mask.shape != (b, n_k) or key_mask.device != q.device):
        raise ValueError(
            f"decode kernel: key_mask {tuple(key_mask.shape)} must be (B, N_k) = ({b}, {n_k}) on {q.device}"
        )
    kmask = index if key_mask is None else (key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous())
    upcast = IMPORTED_INTERPRETED and q.dtype != torch.float32
    out = torch.empty(b, h, n_q, d, device=q.device, dtype=q.dtype)  # contiguous: strides known
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    block_s = max(2, next_power_of_2(splits))
    group_max = logits is not None and logits.dim() == 3
    if group_max and m_blocks > 1:
        raise ValueError(
            f"decode kernel: the group maximum of the logits needs GROUP * N_q <= 64 query rows per KV head, "
            f"got {n_rows}; pass a (B, H, N_q, n * page) logits tensor and reduce it after the call"
        )
    want = (b, h_kv, n_idx * page) if group_max else (b, h, n_q, n_idx * page)
    if logits is not None and (
        tuple(logits.shape) != want
        or logits.dtype != torch.float32
        or not logits.is_contiguous()
        or logits.device != q.device
    ):
        raise ValueError(
            f"decode kernel: logits {tuple(logits.shape)} {logits.dtype} must be a contiguous float32 "
            f"{want} tensor on {q.device} ((B, H, N_q, n * page), or (B, H_kv, n * page) for the group "
            "maximum)"
        )
    merge = (
        FUSED_MERGE
        and counter is not None
        and splits <= FUSED_MERGE_MAX_SPLITS
        and _counter_fits(counter, b * h_kv * m_blocks, q.device)
    )
    decode_split_kernel[(splits, m_blocks, b * h_kv)](
        q, k, v, index, cnt, kmask, o_part, lse_part, counter if merge else cnt, out, lse,
        qs[0], qs[1], qs[2],
        ks[0], ks[1], ks[2],
        vs[0], vs[1], vs[2],
        ids[0], ids[1], kmask.stride(0),
        h * n_q * d, n_q * d, d,
        h_kv, n_q, n_k, n_idx, per_split, d, float(scale),
        GROUP=group, PAGE=page, CAUSAL=bool(causal), HAS_CNT=count is not None, HAS_KMASK=key_mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=upcast, EARLY_V=DECODE_EARLY_V,
        MERGE=merge, BLOCK_S=block_s, LOGITS=logits, WRITE_LOGITS=0 if logits is None else (2 if group_max else 1),
        num_warps=DECODE_WARPS,
        num_stages=(DECODE_LOOP_STAGES if page < block_n < per_split * page else DECODE_STAGES)
        if q.is_cuda
        else 1,
    )  # fmt: skip
    if not merge:
        if MERGE_BLOCK_D & (MERGE_BLOCK_D - 1):
            raise ValueError(f"decode kernel: MERGE_BLOCK_D={MERGE_BLOCK_D} must be a power of two")
        chunk = min(block_d, max(16, MERGE_BLOCK_D))
        decode_merge_kernel[(b * h_kv * n_rows, block_d // chunk)](
            o_part, lse_part, out, lse,
            h * n_q * d, n_q * d, d,
            h_kv, n_q, splits, d,
            PART_D=block_d, GROUP=group, BLOCK_S=block_s, BLOCK_D=chunk,
            num_warps=1 if chunk <= 64 else 2,
        )  # fmt: skip
    return out, lse


def _ranges_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Ranges,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    active_rows: int | None,
) -> tuple[Tensor, Tensor]:
    """:func:`decode_launch` with ``ranges`` (its docstring): the split kernel in RANGES mode, then the merge
    of each row's own splits."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    full, first, sink, win = ranges
    if (
        k.dim() != 4
        or v.shape != k.shape
        or k.shape[0] != b
        or h % h_kv
        or d != k.shape[3]
        or d != v.shape[3]
    ):
        raise ValueError(
            f"decode kernel: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; expected k and v of "
            f"one shape (B={b}, H_kv, N_k, D={d}) with H={h} a multiple of H_kv"
        )
    if not 0 < win < n_k or sink < 0:
        raise ValueError(
            f"decode kernel: ranges need 0 < win < N_k={n_k} and sink >= 0, got win={win}, sink={sink}"
        )
    if full.dim() != 2 or full.shape[1] != h_kv or full.shape[0] not in (1, b) or full.device != q.device:
        raise ValueError(
            f"decode kernel: ranges.full {tuple(full.shape)} on {full.device} must be (B or 1, H_kv) = "
            f"({b} or 1, {h_kv}) on {q.device}"
        )
    if first is not None and (tuple(first.shape) != (b,) or first.device != q.device):
        raise ValueError(
            f"decode kernel: ranges.first {tuple(first.shape)} must be (B,) = ({b},) on {q.device}"
        )
    if key_mask is not None and (key_mask.shape != (b, n_k) or key_mask.device != q.device):
        raise ValueError(
            f"decode kernel: key_mask {tuple(key_mask.shape)} must be (B, N_k) = ({b}, {n_k}) on {q.device}"
        )
    if full.dtype == torch.bool:
        full = full.view(torch.int8)
    if full.stride(1) != 1:
        full = full.contiguous()
    fb = full.stride(0) if full.shape[0] == b else 0
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    if qs[-1] != 1:
        q = q.contiguous()
        qs = q.stride()
    if ks[-1] != 1:
        k = k.contiguous()
        ks = k.stride()
    if vs[-1] != 1:
        v = v.contiguous()
        vs = v.stride()
    group = h // h_kv
    n_rows = group * n_q
    block_m = max(16, min(64, next_power_of_2(n_rows)))
    m_blocks = -(-n_rows // block_m)
    longest = min(n_k, sink + n_k - win) if active_rows == 0 else n_k
    rows = active_rows if active_rows else b * h_kv
    block_n, per_split, splits = plan_splits(
        longest, 1, rows * m_blocks, _target_programs(q), capped=not active_rows
    )
    block_d = head_block(d)
    o_part = torch.empty(b * h_kv * splits * n_rows, block_d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b * h_kv * splits * n_rows, device=q.device, dtype=torch.float32)
    n_split = torch.empty(b * h_kv, device=q.device, dtype=torch.int32)
    kmask = q if key_mask is None else (key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous())
    out = torch.empty(b, h, n_q, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    block_s = max(2, next_power_of_2(splits))
    decode_split_kernel[(splits, m_blocks, b * h_kv)](
        q, k, v, q, q, kmask, o_part, lse_part, q, out, lse,
        qs[0], qs[1], qs[2],
        ks[0], ks[1], ks[2],
        vs[0], vs[1], vs[2],
        0, 0, kmask.stride(0) if key_mask is not None else 0,
        h * n_q * d, n_q * d, d,
        h_kv, n_q, n_k, longest, per_split, d, float(scale),
        GROUP=group, PAGE=1, CAUSAL=bool(causal), HAS_CNT=False, HAS_KMASK=key_mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=IMPORTED_INTERPRETED and q.dtype != torch.float32, EARLY_V=DECODE_EARLY_V,
        MERGE=False, BLOCK_S=block_s, LOGITS=None, WRITE_LOGITS=0,
        RANGES=True, FULL=full, stride_fb=fb, FIRST=q if first is None else first, HAS_FIRST=first is not None,
        NSPLIT=n_split, SINK=int(sink), WIN=int(win),
        num_warps=DECODE_WARPS,
        num_stages=(DECODE_LOOP_STAGES if block_n < per_split else DECODE_STAGES) if q.is_cuda else 1,
    )  # fmt: skip
    chunk = min(block_d, max(16, MERGE_BLOCK_D))
    decode_merge_kernel[(b * h_kv * n_rows, block_d // chunk)](
        o_part, lse_part, out, lse,
        h * n_q * d, n_q * d, d,
        h_kv, n_q, splits, d,
        PART_D=block_d, GROUP=group, BLOCK_S=block_s, BLOCK_D=chunk, NSPLIT=n_split, ROW_SPLITS=True,
        num_warps=1 if chunk <= 64 else 2,
    )  # fmt: skip
    return out, lse


def _counter_fits(counter: Tensor, slots: int, device: torch.device) -> bool:
    if counter.dtype != torch.int32 or counter.device != device or not counter.is_contiguous():
        raise ValueError(
            f"decode kernel: counter must be contiguous int32 on {device}, got {counter.dtype} on {counter.device}"
        )
    return counter.numel() >= slots


def page_scores_launch(q: Tensor, kmax: Tensor, kmin: Tensor, n_pages: int, reduce_max: bool) -> Tensor:
    """(B, H_kv, n_pages) float32 Quest page bounds (fwd.py) of the first ``n_pages`` pages of kmax/kmin
    (B, H_kv, >= n_pages, D), reduced over each KV group's query rows by max or mean."""
    if kmax.shape != kmin.shape or kmax.shape[2] < n_pages or kmax.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"page_scores: kmax {tuple(kmax.shape)} and kmin {tuple(kmin.shape)} must match and hold at least "
            f"{n_pages} pages of head dim {q.shape[-1]}"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    kmax, kmin = (t if t.stride(-1) == 1 else t.contiguous() for t in (kmax, kmin))
    if kmax.stride() != kmin.stride():
        kmax, kmin = kmax.contiguous(), kmin.contiguous()
    b, h, n_q, d = q.shape
    h_kv = kmax.shape[1]
    out = torch.empty(b, h_kv, n_pages, device=q.device, dtype=torch.float32)
    page_score_kernel[(-(-n_pages // BLOCK_P), b * h_kv)](
        q, kmax, kmin, out,
        q.stride(0), q.stride(1), q.stride(2),
        kmax.stride(0), kmax.stride(1), kmax.stride(2),
        h_kv, n_q, n_pages, d,
        GROUP=h // h_kv, REDUCE_MAX=bool(reduce_max), BLOCK_P=BLOCK_P, BLOCK_D=head_block(d),
        num_warps=4,
    )  # fmt: skip
    return out


#: Warps of :func:`row_topk`'s program (None: one per 512 values of the row, at most 16).
TOPK_WARPS: int | None = None
#: The longest row :func:`row_topk` takes (the row is held in one program's registers).
MAX_TOPK_ROW = 16384
#: Pages per program of :func:`page_select` (64 x D summaries of each of max and min: 32 KiB at D=128, bf16).
SELECT_BLOCK_P = 64
#: The most pages :func:`page_select` selects from in its kernel (the row's scores are held in one program's
#: registers); longer rows are scored by the kernel and ranked by ``torch.topk``.
MAX_SELECT_ROW = MAX_TOPK_ROW
#: Pages per scoring program when :func:`page_select` only scores, and its warps. Measured on the H100
#: (8544b74, 128K, GQA 32:8, page 16, budget 4096, tensor-core bounds, page_topk's step in a CUDA graph),
#: B=1 / B=8 in us: 64 pages x 4 warps 64.9 / 193.2; 32 x 4 65.4 / 202.3; 64 x 8 67.2 / 206.4;
#: 128 x 8 71.9 / 241.1; 16 x 4 70.0 / 246.5.
SPLIT_BLOCK_P = 64
SPLIT_WARPS = 4
#: Tiles of ``SPLIT_BLOCK_P`` pages per scoring program (a loop pipelined over ``SPLIT_STAGES`` stages;
#: 1: one tile, no loop). Measured on the H100 (9926e72, 128K, page 16): 2, 4, 8 and 16 tiles no faster
#: than 1 at B=1 or B=8 (benchmarks/results/h100-2026-11-24/decode_ab3/).
SPLIT_TILES = 1
#: The selection kernel's programs in the order (row, block from the row's end): each row's last block,
#: which recomputes the step's stale summaries before it scores, starts first (up to fae1c67 it started
#: last in its row, and the last row's last). The same scores. (The grid's second dimension then holds
#: the blocks: rows of more than 65535 blocks take the other order.)
SCORE_LAST_FIRST = True
SPLIT_STAGES = 2
#: The most stale pages :func:`page_select` recomputes in its kernel (each by one program, serially).
MAX_FUSED_UPDATE = 16
#: With ``dot``: the summaries go from memory into the tensor-core products as loaded (bf16), a page of
#: padding only masked after the products (``page_select_kernel``'s LEAN); False: the fp32 copy with the
#: padding masked before them (the path measured up to 8544b74). The same scores. (Summaries of another
#: dtype than q's take the fp32 copy: the products need one operand dtype.)
SCORE_LEAN = True
#: The search for the ``keep``-th score (:func:`row_topk`, the fused selection) stops once exactly ``keep``
#: scores are at or above its lower end, instead of narrowing to one value. The same positions. (A radix
#: select with ``tl.histogram``, 4 byte-wide passes, measured slower on the H100 at 6bcd603: 29.7 vs 17.8
#: us for 8 rows of 8192 scores; removed.)
TOPK_EARLY_EXIT = True
#: The search for the ``keep``-th score (:func:`row_topk`, the fused selection): "multi" (default) or
#: "ternary" (the search measured up to 9926e72). The same positions. "ternary": a 3-way search over
#: [min, max] of the row's int32 keys, then a count of the scores above the one found. "multi": a first
#: round takes the extremes of the finite scores and the counts of the +inf / -inf ones (a forced page's
#: +inf no longer stretches the bracket over ~1e9 keys: ~5 rounds fewer at 8192 pages), then
#: ``TOPK_THRESHOLDS`` thresholds per round over uint32 keys (32-bit bracket arithmetic, no mask per key,
#: no count after it). Rounds (reductions before the scan; first round and count included) in the exact
#: model of tests/test_decode_topk_search.py over Quest bounds of Gaussian bf16 q / k (D=128, 4 query
#: rows), 8192 pages, keep 256, one forced page, mean / max of 8 rows (and of 64): ternary 14.6 / 17
#: (14.9 / 19), multi with 2, 4, 8 thresholds 8.6 / 11 (8.8 / 13), 6.5 / 8 (6.5 / 9), 5.0 / 6 (5.1 / 7).
TOPK_SEARCH = "multi"
#: Thresholds counted per round of the "multi" search: 2, 4 or 8 (two 16-bit counts per int32 word, one
#: sum per word). More thresholds: fewer rounds, but more work per score in each: the loop bodies compiled
#: by Triton 3.6 for sm_90 (8192 scores, 16 warps) hold 137, 279 and 565 instructions per thread for 2, 4
#: and 8 (the 3-way search's: 192), ~5 integer ops per score for 2 thresholds over 16 scores per thread, so
#: a round at this size is bound by integer issue as much as by the reduction's latency. Measured on the
#: H100 (12ea309, benchmarks/results/h100-2026-11-24-s12/decode/): the row top-k alone on the step's 8
#: rows took 15.5, 17.0 and 19.7 us with 2, 4 and 8 thresholds (ternary 20.0), so 2 stays.
TOPK_THRESHOLDS = 2
#: The "multi" search also stops once all but one of the ``keep`` are above its bracket and takes the
#: bracket's largest score as the ``keep``-th (one max reduction instead of further rounds). The same
#: positions. Modelled (helper-58, s12): about one round fewer on a step's slowest row.
TOPK_BRACKET_MAX = True


def _search_thresholds() -> int:
    """The kernels' THRESHOLDS for ``TOPK_SEARCH`` / ``TOPK_THRESHOLDS`` (0: the 3-way search)."""
    if TOPK_SEARCH == "ternary":
        return 0
    if TOPK_SEARCH != "multi" or TOPK_THRESHOLDS not in (2, 4, 8):
        raise ValueError(
            f"TOPK_SEARCH={TOPK_SEARCH!r}, TOPK_THRESHOLDS={TOPK_THRESHOLDS}: expected 'multi' with 2, 4 or "
            "8 thresholds, or 'ternary'"
        )
    return TOPK_THRESHOLDS


def _select_warps(block_row: int) -> int:
    return 16 if block_row > 8192 else 8


def page_select_launch(
    q: Tensor,
    k: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    counter: Tensor,
    page: int,
    keep: int,
    first_forced: int,
    first_update: int,
    reduce_max: bool,
    key_mask: Tensor | None = None,
    rank: str = "fused",
    dot: bool = False,
) -> tuple[Tensor, Tensor]:
    """page_topk's selection in one launch (fwd.py ``page_select_kernel``).

    q (B, H, N_q, D); k (B, H_kv, N_k, D) the cache, in pages of ``page`` tokens (n_pages = ceil(N_k /
    page)); kmax/kmin (B, H_kv, capacity >= n_pages, D) the page summaries, of which pages ``[first_update, n_pages)`` are recomputed from k here (written in place;
    ``first_update = n_pages``: none; at most ``MAX_FUSED_UPDATE``); ``counter`` (B * H_kv,) int32 zeros
    (left zero); pages ``>= first_forced`` always kept; ``key_mask`` (B, N_k) > 0 for real tokens.
    Returns (index (B, H_kv, keep) int32 of the ``keep`` pages of highest bound, ascending, ties to the
    lowest page; scores (B, H_kv, n_pages) float32, the bounds with forced pages +inf and pages of padding
    only -inf). ``rank``: "fused" (one launch), "triton" (the kernel scores only, in ``SPLIT_BLOCK_P``-page
    programs of 4 warps, then :func:`row_topk`: two launches, the same positions; not measured yet) or
    "torch" (the kernel scores, ``torch.topk`` ranks: positions in its order; what rows longer than
    ``MAX_SELECT_ROW`` get). ``dot``: the bounds as two tensor-core products per program
    (``relu(q) . kmax + min(q, 0) . kmin``, fp32 accumulation) instead of elementwise products and a
    cross-thread sum per query row; the same values up to summation order; not measured yet."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    if page < 1 or page & (page - 1) or page > 256:
        raise ValueError(f"page_select: page={page} must be a power of two in [1, 256]")
    n_pages = -(-n_k // page)
    if (
        kmax.shape != kmin.shape
        or kmax.shape[:2] != (b, h_kv)
        or kmax.shape[2] < n_pages
        or kmax.shape[3] != d
        or k.shape[0] != b
        or k.shape[3] != d
    ):
        raise ValueError(
            f"page_select: kmax {tuple(kmax.shape)} and kmin {tuple(kmin.shape)} must be (B, H_kv, >= "
            f"{n_pages}, D) for q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if (
        not 1 <= keep <= n_pages
        or not 0 <= first_update <= n_pages
        or n_pages - first_update > MAX_FUSED_UPDATE
    ):
        raise ValueError(
            f"page_select: keep={keep}, first_update={first_update} for {n_pages} pages; needs 1 <= keep <= "
            f"n_pages and at most {MAX_FUSED_UPDATE} pages to update"
        )
    if counter.shape != (b * h_kv,) or counter.dtype != torch.int32:
        raise ValueError(f"page_select: counter must be (B * H_kv,) = ({b * h_kv},) int32, got "
                         f"{tuple(counter.shape)} {counter.dtype}")  # fmt: skip
    qs, ks, ms = q.stride(), k.stride(), kmax.stride()
    if qs[-1] != 1:
        q = q.contiguous()
        qs = q.stride()
    if ks[-1] != 1:
        k = k.contiguous()
        ks = k.stride()
    if ms[-1] != 1 or ms != kmin.stride():
        raise ValueError(
            "page_select: kmax/kmin must share strides with a unit last stride (written in place)"
        )
    if key_mask is not None and (key_mask.shape != (b, n_k) or key_mask.device != q.device):
        raise ValueError(
            f"page_select: key_mask {tuple(key_mask.shape)} must be (B, N_k) = ({b}, {n_k}) on {q.device}"
        )
    kmask = counter if key_mask is None else (key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous())
    if rank not in ("fused", "triton", "torch"):
        raise ValueError(f"page_select: rank={rank!r}; expected 'fused', 'triton' or 'torch'")
    if n_pages > MAX_SELECT_ROW:
        rank = "torch"
    fused = rank == "fused"
    block_row = next_power_of_2(max(n_pages, 16))
    scores = torch.empty(b, h_kv, n_pages, device=q.device, dtype=torch.float32)
    # IDX is written by the fused launch only; the other ranks make their own index (the kernel gets the
    # int32 counter as a never-written stand-in: one allocation less per step)
    index = torch.empty(b, h_kv, keep, device=q.device, dtype=torch.int32) if fused else counter
    block_p = 16 if IMPORTED_INTERPRETED else (SELECT_BLOCK_P if fused else SPLIT_BLOCK_P)
    tiles = 1 if fused else max(1, min(SPLIT_TILES, -(-n_pages // block_p)))
    blocks = -(-n_pages // (block_p * tiles))
    last_first = SCORE_LAST_FIRST and blocks <= 65535
    page_select_kernel[(b * h_kv, blocks) if last_first else (blocks, b * h_kv)](
        q, k, kmask, kmax, kmin, scores, index, counter,
        qs[0], qs[1], qs[2],
        ks[0], ks[1], ks[2],
        ms[0], ms[1], ms[2], kmask.stride(0),
        h_kv, n_q, n_k, n_pages, d, first_update, first_forced, keep,
        GROUP=h // h_kv, PAGE=page, REDUCE_MAX=bool(reduce_max), HAS_KMASK=key_mask is not None,
        SELECT=fused, BLOCK_P=block_p, BLOCK_D=head_block(d),
        BLOCK_ROW=block_row if fused else 16,
        DOT=bool(dot), BLOCK_M=max(16, next_power_of_2((h // h_kv) * n_q)),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=IMPORTED_INTERPRETED and q.dtype != torch.float32,
        LEAN=SCORE_LEAN and kmax.dtype == q.dtype, EARLY=TOPK_EARLY_EXIT, THRESHOLDS=_search_thresholds(), BMAX=TOPK_BRACKET_MAX,
        TILES=tiles, STAGES=SPLIT_STAGES if q.is_cuda else 1, LAST_FIRST=last_first,
        num_warps=_select_warps(block_row) if fused else SPLIT_WARPS,
    )  # fmt: skip
    if rank == "triton":
        index = row_topk_launch(scores, keep)
    elif rank == "torch":
        index = torch.topk(scores, keep, dim=-1, sorted=False).indices.to(torch.int32)
    return index, scores


def row_topk_launch(x: Tensor, k: int, rounds: Tensor | None = None) -> Tensor:
    """(..., k) int32 positions of the k largest values of each row of x (..., N) float32, ascending (ties
    at the k-th value: the lowest positions); N <= MAX_TOPK_ROW, 1 <= k <= N. ``rounds``: an int32 tensor
    of x.numel() // N elements (contiguous) that gets each row's search rounds (see :func:`search_rounds`)."""
    n = x.shape[-1]
    if not 1 <= k <= n or n > MAX_TOPK_ROW:
        raise ValueError(f"row_topk: k={k} of rows of {n} values; needs 1 <= k <= N <= {MAX_TOPK_ROW}")
    rows = x.reshape(-1, n)  # (a view for page_select's contiguous scores: no copy, no cast)
    if rows.dtype != torch.float32:
        rows = rows.float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, device=x.device, dtype=torch.int32)
    block = next_power_of_2(max(n, 16))
    row_topk_kernel[(rows.shape[0],)](
        rows,
        out,
        out if rounds is None else rounds,
        n,
        k,
        rows.stride(0),
        out.stride(0),
        BLOCK=block,
        EARLY=TOPK_EARLY_EXIT,
        THRESHOLDS=_search_thresholds(),
        BMAX=TOPK_BRACKET_MAX,
        COUNT_ROUNDS=rounds is not None,
        num_warps=TOPK_WARPS or min(16, max(1, block // 512)),
    )
    return out.view(*x.shape[:-1], k)


def search_rounds(x: Tensor, k: int) -> Tensor:
    """(...) int32: the reduction rounds :func:`row_topk`'s search takes for each row of x (..., N) under the
    current ``TOPK_SEARCH`` / ``TOPK_THRESHOLDS`` / ``TOPK_EARLY_EXIT`` (the first round of extremes
    included; "ternary" also counts its count of the scores above the value found), for the benchmark
    and the tests. The scan that places the positions is not counted."""
    rounds = torch.empty(x.shape[:-1], device=x.device, dtype=torch.int32)
    row_topk_launch(x, k, rounds)
    return rounds


@torch.library.custom_op("attnlab::row_topk", mutates_args=())
def row_topk_op(x: Tensor, k: int) -> Tensor:
    return row_topk_launch(x, k)


@row_topk_op.register_fake
def _(x: Tensor, k: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], k), dtype=torch.int32)


def row_topk(x: Tensor, k: int) -> Tensor:
    """Positions of each row's k largest values, ascending, through the Triton kernel (not yet measured
    against ``torch.topk``; page_topk uses it only when ``USE_TRITON_TOPK``)."""
    if torch.compiler.is_compiling():
        return row_topk_op(x, int(k))
    return row_topk_launch(x, int(k))


@torch.library.custom_op("attnlab::decode_select_fwd", mutates_args=())
def decode_select_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return decode_launch(q, k, v, index, count, page, scale, causal, key_mask)


@decode_select_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    # contiguous, as the launcher's outputs (empty_like would keep a transposed q's strides)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attnlab::page_scores", mutates_args=())
def page_scores_op(q: Tensor, kmax: Tensor, kmin: Tensor, n_pages: int, reduce_max: bool) -> Tensor:
    return page_scores_launch(q, kmax, kmin, n_pages, reduce_max)


@page_scores_op.register_fake
def _(q: Tensor, kmax: Tensor, kmin: Tensor, n_pages: int, reduce_max: bool) -> Tensor:
    return q.new_empty((q.shape[0], kmax.shape[1], n_pages), dtype=torch.float32)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    counter: Tensor | None = None,
    active_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention over the selected cache entries (see :mod:`attnlab.kernels.decode.naive`
    for the exact meaning of ``index``, ``count``, ``page`` and ``key_mask``), through the Triton kernels. Inside
    ``torch.compile`` through the custom op (two launches; ``counter`` unused); in eager mode the launcher
    is called directly (the custom op's dispatch costs tens of microseconds of Python per call, a decode
    step's whole budget), with ``counter`` (see :func:`decode_launch`) in one launch; ``active_rows``
    as :func:`decode_launch` takes it (eager only: the custom op plans for every row)."""
    if torch.compiler.is_compiling():
        return decode_select_fwd(q, k, v, index, count, int(page), float(scale), bool(causal), key_mask)
    return decode_launch(
        q,
        k,
        v,
        index,
        count,
        int(page),
        float(scale),
        bool(causal),
        key_mask,
        counter,
        active_rows=active_rows,
    )


@torch.library.custom_op("attnlab::decode_ranges_fwd", mutates_args=())
def decode_ranges_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    full: Tensor,
    first: Tensor | None,
    sink: int,
    win: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    active_rows: int,
) -> tuple[Tensor, Tensor]:
    ranges = Ranges(full, first, sink, win)
    active = None if active_rows < 0 else active_rows
    return decode_launch(q, k, v, None, None, 1, scale, causal, key_mask, active_rows=active, ranges=ranges)


@decode_ranges_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    full: Tensor,
    first: Tensor | None,
    sink: int,
    win: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    active_rows: int,
) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def decode_ranges(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Ranges,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    active_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention where each (batch, KV head) row reads contiguous token runs (:class:`Ranges`:
    the whole cache, or sinks + a recent window), one split-K launch and its merge, no index tensor.
    ``active_rows``: how many rows read the whole cache when the caller knows it (0: none; a promise: the
    splits then cover only the sink + window length, and a full row would read just that many tokens),
    else None.
    Inside ``torch.compile`` through the custom op ``attnlab::decode_ranges_fwd``."""
    if torch.compiler.is_compiling():
        full, first, sink, win = ranges
        active = -1 if active_rows is None else int(active_rows)
        return decode_ranges_fwd(
            q, k, v, full, first, int(sink), int(win), float(scale), bool(causal), key_mask, active
        )
    return decode_launch(
        q, k, v, None, None, 1, float(scale), bool(causal), key_mask, active_rows=active_rows, ranges=ranges
    )


@torch.library.custom_op("attnlab::decode_logits_fwd", mutates_args=())
def decode_logits_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    group_max: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return _decode_with_logits(q, k, v, index, count, page, scale, causal, key_mask, group_max)


@decode_logits_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    group_max: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n_q = q.shape[:3]
    q = q if q.stride(-1) == 1 else q.contiguous()
    n = index.shape[2] * page
    logits = q.new_empty((b, k.shape[1], n) if group_max else (b, h, n_q, n), dtype=torch.float32)
    out = q.new_empty(q.shape)  # (contiguous, as the launcher's)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32), logits


def _decode_with_logits(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    group_max: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n_q = q.shape[:3]
    shape = (b, k.shape[1], index.shape[2] * page) if group_max else (b, h, n_q, index.shape[2] * page)
    logits = (
        torch.empty(shape, device=q.device, dtype=torch.float32)
        if count is None
        else torch.full(shape, float("-inf"), device=q.device, dtype=torch.float32)
    )
    out, lse = decode_launch(q, k, v, index, count, page, scale, causal, key_mask, None, logits)
    return out, lse, logits


def decode_attention_logits(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    count: Tensor | None,
    page: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    group_max: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, logits) of :func:`decode_attention` together with the attention's own scores: ``logits``
    (B, H, N_q, n * page) float32 holds ``scale * q . k`` of column ``e * page + offset`` of the index list
    (-inf where the token is not allowed: past the cache, causal, padding, a negative entry, or past
    ``count``). ``softmax(logits, -1)`` are the attention weights (``exp(logits - lse)``). One pass over
    the selected K/V: a selection that keeps what the attention weighted most (recycled attention's full
    step, TidalDecode's selection layer, H2O's per-step scores) costs one store of the scores more.
    ``group_max``: ``logits`` (B, H_kv, n * page) holds instead each token's maximum over its KV group's
    query heads and queries (GROUP * N_q <= 64; TidalDecode's score): a quarter of the store at GQA 4:1."""
    args = (q, k, v, index, count, int(page), float(scale), bool(causal), key_mask, bool(group_max))
    if torch.compiler.is_compiling():
        return decode_logits_fwd(*args)
    return _decode_with_logits(*args)


@torch.library.custom_op("attnlab::page_select", mutates_args=("kmax", "kmin", "counter"))
def page_select_op(
    q: Tensor,
    k: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    counter: Tensor,
    page: int,
    keep: int,
    first_forced: int,
    first_update: int,
    reduce_max: bool,
    key_mask: Tensor | None,
    dot: bool,
    rank: str = "fused",
) -> tuple[Tensor, Tensor]:
    return page_select_launch(
        q, k, kmax, kmin, counter, page, keep, first_forced, first_update, reduce_max, key_mask, rank, dot
    )


@page_select_op.register_fake
def _(
    q: Tensor,
    k: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    counter: Tensor,
    page: int,
    keep: int,
    first_forced: int,
    first_update: int,
    reduce_max: bool,
    key_mask: Tensor | None,
    dot: bool,
    rank: str = "fused",
) -> tuple[Tensor, Tensor]:
    b, h_kv = kmax.shape[:2]
    n_pages = -(-k.shape[2] // page)
    return (
        q.new_empty((b, h_kv, keep), dtype=torch.int32),
        q.new_empty((b, h_kv, n_pages), dtype=torch.float32),
    )


def page_select(
    q: Tensor,
    k: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    counter: Tensor,
    page: int,
    keep: int,
    first_forced: int,
    first_update: int,
    reduce_max: bool = True,
    key_mask: Tensor | None = None,
    dot: bool = False,
    rank: str = "fused",
) -> tuple[Tensor, Tensor]:
    """page_topk's selection in one launch: (index (B, H_kv, keep) int32 ascending, scores (B, H_kv,
    n_pages) float32); see :func:`page_select_launch` (``rank`` and ``dot`` as there). Updates pages
    ``[first_update, n_pages)`` of kmax/kmin in place. Through the custom op inside ``torch.compile``, the
    launcher directly otherwise."""
    args = (int(page), int(keep), int(first_forced), int(first_update), bool(reduce_max))
    if torch.compiler.is_compiling():
        return page_select_op(q, k, kmax, kmin, counter, *args, key_mask, bool(dot), str(rank))
    return page_select_launch(q, k, kmax, kmin, counter, *args, key_mask, rank=rank, dot=bool(dot))


def page_scores(q: Tensor, kmax: Tensor, kmin: Tensor, n_pages: int, reduce_max: bool = True) -> Tensor:
    """Quest page bounds (B, H_kv, n_pages) float32 through the Triton kernel (the custom op inside
    ``torch.compile``, the launcher directly otherwise)."""
    if torch.compiler.is_compiling():
        return page_scores_op(q, kmax, kmin, int(n_pages), bool(reduce_max))
    return page_scores_launch(q, kmax, kmin, int(n_pages), bool(reduce_max))
