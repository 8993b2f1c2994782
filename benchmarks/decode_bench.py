"""Decode-step benchmark of page_topk (Quest) against dense SDPA decode over a long cache (GPU).

One decode step of one layer: q (B, 32, 1, 128) against a cache k/v (B, 8, N, 128) (GQA 32:8), bf16.

Checks first (correctness before speed):
- the split-K kernel against its fp32 naive twin over the same selection (the 2x accuracy rule against the
  same math in bf16 PyTorch: gather + SDPA);
- the fused selection (``page_select``: summary update, bounds, top pages in one launch) against the rule
  applied to its own scores (row_topk_naive: exact, ties to the lowest page) and against ``torch.topk`` on
  the same scores (share of pages in common: ties aside, 1.0); the fast selection against the fp32
  reference selection (share of pages in common).

Timed, CUDA events, interleaved rounds in rotating order, the L2 cache flushed (a 256 MiB write) before
every timed call (in a model every layer reads a different cache, so nothing stays in L2):
- ``dense_cudnn`` / ``dense_flash``: SDPA decode over the whole cache with that kernel only;
- ``page_topk_step``: the prepared op as called, eager, state included (the selection of the fast path: the
  fused launch with the summary update of one appended token, or above ``page_topk.FUSED_MAX_SCORES`` the
  split path; ``step_path`` says which), the split-K decode kernel, merge;
- ``page_topk_graph``: the same step captured in a CUDA graph (no Python/launch overhead);
- parts, each captured in a CUDA graph (GPU time without the host): ``select_fused`` (the one selection
  launch), ``select_scores_torch_topk`` (the same kernel scoring, ``torch.topk`` ranking),
  ``select_two_launch`` (the kernel scoring in page_score_kernel's tile, then attnlab's row top-k),
  ``select_fused_dot`` / ``select_two_launch_dot`` (the same with the bounds as tensor-core products),
  ``select_previous`` (the previous path: page-score kernel, forced pages, ``torch.topk``, int32),
  ``topk_torch`` / ``topk_triton`` (``torch.topk`` / attnlab's row top-k alone on the same scores),
  ``topk_triton_forced_<search>`` (the row top-k on the step's rows, the forced page +inf, with each search
  for the keep-th score: ``op.TOPK_SEARCH`` / ``TOPK_THRESHOLDS``; their exactness and the kernel's rounds
  per row are in ``checks.row_topk.searches_on_forced_rows``),
  ``kernel_only`` (decode kernel + merge over a fixed selection), ``kernel_all_pages`` (the decode kernel
  over every page: its bandwidth on a dense read);
- ``flash_gathered`` (FlashAttention over a pre-gathered budget-sized K/V: the floor the issue quotes).
Bytes: dense reads K and V once; page_topk reads the page summaries (2 x N / page x D per KV head) and
the selected K/V (2 x budget x D per KV head). Bandwidth shares are against 3.35 TB/s (H100 SXM HBM3).

Every decode method's step (page_topk's included), eager and in a CUDA graph, is timed by
``decode_methods_bench.py``.

Usage: python benchmarks/decode_bench.py --out results.json [--context 131072] [--batches 1 8]
       [--pages 16 32 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnlab
from attnlab.bench.env import environment
from attnlab.bench.timing import Timing
from attnlab.catalog.decode import SPECS as decode_specs
from attnlab.catalog.decode import page_topk
from attnlab.core import Result
from attnlab.registry import registered
from attnlab.state.pages import summarize

HBM_BYTES_PER_S = 3.35e12
#: sides whose warm-up raised: name -> error
FAILED: dict[str, str] = {}
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
#: split-K decode kernel settings timed beside the default (op.BLOCK_N, DECODE_STAGES, DECODE_WARPS,
#: PROGRAMS_PER_SM), alone over a fixed selection (``kernel_only_<name>``) and in the whole step
DECODE_KERNEL_VARIANTS: dict[str, dict[str, Any]] = {
    "dec_s2": {"DECODE_STAGES": 2},  # the default up to 12f0b1b
    "bn32": {"BLOCK_N": 32},
    "bn32_s2": {"BLOCK_N": 32, "DECODE_STAGES": 2},
    "merge1": {"MERGE_BLOCK_D": 128},  # one merge program per row (up to fae1c67)
    "merge16": {"MERGE_BLOCK_D": 16},
    "merge64": {"MERGE_BLOCK_D": 64},
}


def timed(fns: dict[str, Callable[[], object]], reps: int, flush: torch.Tensor) -> dict[str, Timing]:
    """Interleaved rounds (each round starts one function later), L2 flushed before each timed call.
    A function that raises in its warm-up is left out (its error is in ``FAILED``)."""
    for name, fn in list(fns.items()):  # warm-up (compilation, autotuning, cuDNN plans)
        try:
            fn()
            fn()
        except Exception as e:
            FAILED[name] = f"{type(e).__name__}: {str(e)[:300]}"
            del fns[name]
    if not flush.is_cuda:  # --smoke: wall clock
        t: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                t[name].append((time.perf_counter() - t0) * 1e3)
        return {n: Timing.of(ts) for n, ts in t.items()}
    torch.cuda.synchronize()
    names = list(fns)
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {n: Timing.of([a.elapsed_time(z) for a, z in ev]) for n, ev in events.items()}


def row(t: Timing, nbytes: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "median_us": round(t.median_ms * 1e3, 2),
        "min_us": round(t.min_ms * 1e3, 2),
        "iqr_us": round((t.iqr_ms or 0.0) * 1e3, 2),
        "reps": t.reps,
    }
    if nbytes is not None:
        out["bytes"] = nbytes
        out["hbm_share_at_median"] = round(nbytes / (t.median_ms * 1e-3) / HBM_BYTES_PER_S, 3)
    return out


def graph_of(fn: Callable[[], object]) -> Callable[[], object]:
    if not torch.cuda.is_available():  # --smoke
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_batch(b: int, n: int, budget: int, page: int, reps: int, flush: torch.Tensor) -> dict[str, Any]:
    from attnlab.kernels.decode.naive import decode_attention_naive, row_topk_naive
    from attnlab.kernels.decode.op import decode_attention, page_scores, page_select, row_topk

    torch.manual_seed(b)
    dev = flush.device
    q = torch.randn(b, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    params: dict[str, Any] = {"budget": budget, "page": page}
    op = attnlab.prepare("page_topk", causal=True, **params)
    # the state of the cache before this step's token: each timed step appends one token (last page)
    first = op(q, k[:, :, : n - 1], v[:, :, : n - 1])
    assert isinstance(first, Result)
    state = first.state
    res = op(q, k, v, state=state)
    assert isinstance(res, Result)
    call = attnlab.resolve(q, k, v, method="page_topk", causal=True, **params)
    sel, summary = page_topk.select(q, k, v, call, {}, None, True)
    assert sel is not None

    # -- checks (per batch element: the fp32 twins expand K/V to every query head) ------------------
    from attnlab.backends.decode_select import Selection, gather_attention

    got, lse = decode_attention(q, k, v, sel.index, None, page, scale, True)
    ptk = page_topk.PageTopkParams(budget=budget, page=page)
    err = err_low = lse_err = step_err = peak = 0.0
    overlap = []
    for i in range(b):
        qi, ki, vi = q[i : i + 1], k[i : i + 1], v[i : i + 1]
        idx_i = sel.index[i : i + 1]
        want, want_lse = decode_attention_naive(qi, ki, vi, idx_i, page, scale, True)  # fp32 math
        low = gather_attention(qi, ki, vi, Selection(idx_i, page), scale, True)  # the same math in bf16
        err = max(err, float((got[i : i + 1].float() - want.float()).abs().max()))
        err_low = max(err_low, float((low.float() - want.float()).abs().max()))
        lse_err = max(lse_err, float((lse[i : i + 1] - want_lse).abs().max()))
        peak = max(peak, float(want.float().abs().max()))
        ref_out, _ = page_topk.reference(qi, ki, vi, ptk, causal=True, scale=scale)
        step_err = max(step_err, float((res.out[i : i + 1].float() - ref_out.float()).abs().max()))
        call_i = attnlab.resolve(qi, ki, vi, method="page_topk", causal=True, **params)
        ref_sel, _ = page_topk.select(qi.float(), ki.float(), vi.float(), call_i, {}, None, False)
        assert ref_sel is not None
        a = torch.zeros(KV_HEADS, summary.n_pages, dtype=torch.bool, device=dev)
        a[torch.arange(KV_HEADS, device=dev)[:, None], idx_i[0].long()] = True
        overlap.append(float(a.gather(1, ref_sel.index[0].long()).float().mean()))
        del want, low, ref_out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # the fused selection: exactly the rule over its own scores, and torch.topk's pages on those scores
    n_pages0 = summary.n_pages
    keep0 = sel.index.shape[2]
    counter = torch.zeros(b * KV_HEADS, dtype=torch.int32, device=dev)
    fused_idx, fused_scores = page_select(
        q, k, summary.kmax, summary.kmin, counter, page, keep0, (n - 1) // page, n_pages0, True
    )
    rule_exact = bool(torch.equal(fused_idx, row_topk_naive(fused_scores, keep0)))
    tk = torch.topk(fused_scores, keep0, dim=-1).indices
    picked = torch.zeros(b, KV_HEADS, n_pages0, dtype=torch.bool, device=dev)
    picked.scatter_(2, fused_idx.long(), True)
    topk_overlap = float(picked.gather(2, tk).float().mean())
    counter_zero = bool((counter == 0).all())
    from attnlab.kernels.decode.op import page_select_launch

    variants: dict[str, Any] = {}  # the not-yet-default selections: exact rule over their scores, and
    for name, rank, dot in (("two_launch", "triton", False), ("fused_dot", "fused", True),
                            ("two_launch_dot", "triton", True)):  # fmt: skip
        v_idx, v_scores = page_select_launch(q, k, summary.kmax, summary.kmin, counter, page, keep0,
                                             (n - 1) // page, n_pages0, True, rank=rank, dot=dot)  # fmt: skip
        fin = torch.isfinite(fused_scores)
        variants[name] = {
            "rule_over_its_scores": bool(torch.equal(v_idx, row_topk_naive(v_scores, keep0))),
            "scores_vs_fused_max_abs": float((v_scores[fin] - fused_scores[fin]).abs().max()),
            "same_pages_as_fused": round(float(v_idx.eq(fused_idx).float().mean()), 6),
        }
    bound = 2 * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(torch.bfloat16).eps * peak
    checks = {
        "kernel_vs_naive_max_abs": err,
        "bf16_torch_vs_naive_max_abs": err_low,
        "bound": bound,
        "kernel_within_rule": err <= bound,
        "lse_max_abs": lse_err,
        "step_vs_reference_max_abs": step_err,
        "fast_vs_reference_selection_overlap": round(min(overlap), 4),
        "fused_selection_is_rule_over_its_scores": rule_exact,
        "fused_vs_torch_topk_same_scores_overlap": round(topk_overlap, 6),
        "fused_counters_left_zero": counter_zero,
        "variants": variants,
    }

    # -- timing ---------------------------------------------------------------------------------------
    def dense(kind: SDPBackend) -> Callable[[], object]:
        kinds = [kind] if dev.type == "cuda" else [SDPBackend.MATH]  # (--smoke: the CPU kernel)

        def fn() -> object:
            with sdpa_kernel(kinds):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        return fn

    def step() -> object:
        return op(q, k, v, state=state)  # one appended token: the last page's summary is recomputed

    n_pages = summary.n_pages
    keep = sel.index.shape[2]
    first_forced = (n - 1) // page
    sel_state = summarize(k, page)  # its last page is recomputed by every select_fused call
    sel_counter = sel_state.select_counter()

    def select_fused() -> object:  # one launch: last page's summary, bounds, top pages
        return page_select(q, k, sel_state.kmax, sel_state.kmin, sel_counter, page, keep, first_forced,
                           n_pages - 1, True)[0]  # fmt: skip

    def select_scores_torch_topk() -> object:  # the same kernel scoring, torch.topk ranking
        from attnlab.kernels.decode.op import page_select_launch

        return page_select_launch(q, k, sel_state.kmax, sel_state.kmin, sel_counter, page, keep,
                                  first_forced, n_pages, True, rank="torch")[0]  # fmt: skip

    def select_two_launch() -> object:  # the same kernel scoring (last page updated), then row_topk
        from attnlab.kernels.decode.op import page_select_launch

        return page_select_launch(q, k, sel_state.kmax, sel_state.kmin, sel_counter, page, keep,
                                  first_forced, n_pages - 1, True, rank="triton")[0]  # fmt: skip

    def select_fused_dot() -> object:  # select_fused, bounds as tensor-core products
        return page_select(q, k, sel_state.kmax, sel_state.kmin, sel_counter, page, keep, first_forced,
                           n_pages - 1, True, dot=True)[0]  # fmt: skip

    def select_two_launch_dot() -> object:  # select_two_launch, bounds as tensor-core products
        from attnlab.kernels.decode.op import page_select_launch

        return page_select_launch(q, k, sel_state.kmax, sel_state.kmin, sel_counter, page, keep,
                                  first_forced, n_pages - 1, True, rank="triton", dot=True)[0]  # fmt: skip

    def select_previous() -> object:  # the path before the fused kernel (1559cad)
        s = page_scores(q, summary.kmax, summary.kmin, n_pages, True)
        s[..., first_forced:] = float("inf")
        return torch.topk(s, keep, dim=-1, sorted=False).indices.to(torch.int32)

    fixed_scores = page_scores(q, summary.kmax, summary.kmin, n_pages, True)

    def topk_torch() -> object:  # torch.topk alone, over (B * H_kv) rows of n_pages scores
        return torch.topk(fixed_scores, keep, dim=-1, sorted=False).indices

    from attnlab.kernels.decode import op as dop_
    from attnlab.kernels.decode.op import search_rounds

    # the step's rows: the same scores with the forced (last) page +inf, as the scoring kernel writes them
    forced_scores = fixed_scores.clone()
    forced_scores[..., first_forced:] = float("inf")

    @contextlib.contextmanager
    def search_flags(**flags: Any) -> Iterator[None]:
        """op's search flags (TOPK_*) set for the block (a CUDA graph captured in it keeps them)."""
        saved_search = {f: getattr(dop_, f) for f in flags}
        for f, val in flags.items():
            setattr(dop_, f, val)
        try:
            yield
        finally:
            for f, val in saved_search.items():
                setattr(dop_, f, val)

    def topk_with(scores: torch.Tensor, name: str, **flags: Any) -> Callable[[], torch.Tensor]:
        """attnlab's row top-k on these rows under ``search_flags(**flags)``."""

        def fn() -> torch.Tensor:
            with search_flags(**flags):
                return row_topk(scores, keep)

        fn.__name__ = name
        return fn

    topk_triton = topk_with(fixed_scores, "topk_triton")  # the default search
    topk_triton_narrow = topk_with(fixed_scores, "topk_triton_narrow", TOPK_EARLY_EXIT=False)  # to one value
    # the search for the keep-th score (op.TOPK_SEARCH / TOPK_THRESHOLDS) on the step's rows
    searches: dict[str, dict[str, Any]] = {
        "default": {},
        "ternary": {"TOPK_SEARCH": "ternary"},
        "multi2": {"TOPK_SEARCH": "multi", "TOPK_THRESHOLDS": 2},
        "multi4": {"TOPK_SEARCH": "multi", "TOPK_THRESHOLDS": 4},
        "multi8": {"TOPK_SEARCH": "multi", "TOPK_THRESHOLDS": 8},
        "no_bmax": {"TOPK_BRACKET_MAX": False},
    }
    topk_sides = {
        f"topk_triton_forced_{name}": topk_with(forced_scores, f"topk_triton_forced_{name}", **flags)
        for name, flags in searches.items()
    }
    search_checks: dict[str, Any] = {}
    for name, flags in searches.items():
        exact = all(
            torch.equal(topk_with(scores, name, **flags)(), row_topk_naive(scores, keep))
            for scores in (fixed_scores, forced_scores)
        )
        with search_flags(**flags):  # the kernel's own rounds per row (reductions before its scan)
            rounds = search_rounds(forced_scores, keep).float()
        search_checks[name] = {
            "vs_naive_exact": exact,
            "rounds_mean": round(float(rounds.mean()), 2),
            "rounds_max": int(rounds.max()),
        }
    topk_checks = {
        "early_exit_vs_naive_exact": bool(torch.equal(topk_triton(), row_topk_naive(fixed_scores, keep))),
        "narrow_vs_naive_exact": bool(torch.equal(topk_triton_narrow(), row_topk_naive(fixed_scores, keep))),
        "searches_on_forced_rows": search_checks,
    }

    idx = sel.index

    def kernel_only() -> object:  # split-K launch + merge launch
        return decode_attention(q, k, v, idx, None, page, scale, True)[0]

    merge_counter = torch.zeros(8 * b * KV_HEADS, dtype=torch.int32, device=dev)

    def kernel_only_merged() -> object:  # one launch: the split-K kernel merges its own splits
        with search_flags(FUSED_MERGE=True):  # (off by default since fae1c67; up to s13 this side, its
            # check and its counters' check ran the two launches in decode_run2 .. decode_run4b)
            return decode_attention(q, k, v, idx, None, page, scale, True, counter=merge_counter)[0]

    def kernel_with(name: str, **flags: Any) -> Callable[[], object]:
        def fn() -> object:
            with search_flags(**flags):
                return kernel_only()

        fn.__name__ = name
        return fn

    kernel_sides = {
        f"kernel_only_{n}": kernel_with(f"kernel_only_{n}", **f) for n, f in DECODE_KERNEL_VARIANTS.items()
    }
    merged_vs_two = float((kernel_only_merged().float() - kernel_only().float()).abs().max())  # type: ignore[attr-defined]
    checks["kernel_merged_vs_two_launches_max_abs"] = merged_vs_two
    checks["merge_counters_left_zero"] = bool((merge_counter == 0).all())

    tok = (idx.long()[..., None] * page + torch.arange(page, device=dev)).flatten(2)
    kg = k.gather(2, tok[..., None].expand(-1, -1, -1, HEAD_DIM)).contiguous()
    vg = v.gather(2, tok[..., None].expand(-1, -1, -1, HEAD_DIM)).contiguous()

    every = torch.arange(n_pages, device=dev, dtype=torch.int32).expand(b, KV_HEADS, -1).contiguous()

    def kernel_all_pages() -> object:  # the kernel reading the whole cache: its bandwidth on a dense read
        return decode_attention(q, k, v, every, None, page, scale, True)[0]

    def flash_gathered() -> object:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if dev.type == "cuda" else [SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, kg, vg, scale=scale, enable_gqa=True)

    # the step (as called, in a CUDA graph) with each fast selection of page_topk (SMALL/LARGE_SELECT);
    # each checked against the default step's output (the same rule: equal up to ties and summation order)
    modes: dict[str, tuple[str, bool] | None] = {
        "fused": ("fused", False), "two_launch": ("triton", False), "fused_dot": ("fused", True),
        "two_launch_dot": ("triton", True), "split": None,
    }  # fmt: skip
    saved = (page_topk.SMALL_SELECT, page_topk.LARGE_SELECT)
    mode_steps: dict[str, Callable[[], object]] = {}
    mode_checks: dict[str, Any] = {}
    for mode_name, mode in modes.items():
        page_topk.SMALL_SELECT = page_topk.LARGE_SELECT = mode
        try:
            out_m = step()
            assert isinstance(out_m, Result)
            mode_checks[mode_name] = {
                "step_vs_default_step_max_abs": float((out_m.out.float() - res.out.float()).abs().max())
            }
            g = graph_of(step)
            mode_steps[f"step_graph_{mode_name}"] = g
        except Exception as e:  # recorded; the side is left out
            FAILED[f"step_graph_{mode_name}"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            page_topk.SMALL_SELECT, page_topk.LARGE_SELECT = saved
    from attnlab.kernels.decode import op as dop

    # the default step with other scoring tiles of the two-launch selection (pages per program, warps),
    # with each change of this version off (op.SCORE_LEAN, op.TOPK_EARLY_EXIT, op.DECODE_EARLY_V), with the
    # other searches for the keep-th score (op.TOPK_SEARCH, op.TOPK_THRESHOLDS), and with other split-K
    # program counts / inner steps of the decode kernel
    names = (
        "SCORE_LEAN", "TOPK_EARLY_EXIT", "DECODE_EARLY_V", "PROGRAMS_PER_SM", "BLOCK_N", "SPLIT_TILES",
        "SPLIT_STAGES", "TOPK_WARPS", "DECODE_WARPS", "DECODE_STAGES", "SPLIT_BLOCK_P", "SPLIT_WARPS",
        "TOPK_SEARCH", "TOPK_THRESHOLDS", "FUSED_MERGE", "TOPK_BRACKET_MAX", "SCORE_LAST_FIRST", "MERGE_BLOCK_D",
    )  # fmt: skip
    saved_flags = {f: getattr(dop, f) for f in names}
    variants_of_step: dict[str, dict[str, Any]] = {
        "step_graph_before": {  # before 2026-11-23's search and scoring changes
            "SCORE_LEAN": False,
            "TOPK_EARLY_EXIT": False,
            "DECODE_EARLY_V": False,
            "TOPK_SEARCH": "ternary",
            "TOPK_BRACKET_MAX": False,
        },
        # the default of 2026-11-24's s12
        "step_graph_before_s13": {
            "TOPK_BRACKET_MAX": False,
            "SCORE_LAST_FIRST": False,
            "MERGE_BLOCK_D": 128,
            "DECODE_STAGES": 2,
        },
        "step_graph_no_bmax": {"TOPK_BRACKET_MAX": False},
        "step_graph_row_order": {"SCORE_LAST_FIRST": False},
        "step_graph_fused_merge": {"FUSED_MERGE": True},
        # scoring tiles, row top-k warps, and the split-K decode kernel's tiles / stages / warps / programs
        "step_graph_tile64x2w": {"SPLIT_BLOCK_P": 64, "SPLIT_WARPS": 2},
        "step_graph_tile32x4w": {"SPLIT_BLOCK_P": 32, "SPLIT_WARPS": 4},
        "step_graph_topk8w": {"TOPK_WARPS": 8},
        **{f"step_graph_{name}": flags for name, flags in DECODE_KERNEL_VARIANTS.items()},
        "step_graph_small": {"BLOCK_N": 32, "DECODE_STAGES": 1, "TOPK_WARPS": 8},
    }
    for name, changed in variants_of_step.items():
        for f, val in changed.items():
            setattr(dop, f, val)
        try:
            out_f = step()
            assert isinstance(out_f, Result)
            mode_checks[name] = {
                "step_vs_default_step_max_abs": float((out_f.out.float() - res.out.float()).abs().max())
            }
            mode_steps[name] = graph_of(step)
        except Exception as e:  # recorded; the side is left out
            FAILED[name] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            for f, val in saved_flags.items():
                setattr(dop, f, val)
    checks["step_modes"] = mode_checks
    checks["row_topk"] = topk_checks

    def graphed(fn: Callable[[], object]) -> Callable[[], object]:
        try:
            return graph_of(fn)
        except Exception as e:  # recorded; the side is left out
            FAILED[f"graph:{fn.__name__}"] = f"{type(e).__name__}: {str(e)[:300]}"

            def failed() -> object:
                raise RuntimeError("graph capture failed")

            return failed

    fns = {
        "dense_cudnn": dense(SDPBackend.CUDNN_ATTENTION),
        "dense_flash": dense(SDPBackend.FLASH_ATTENTION),
        "page_topk_step": step,
        "page_topk_graph": graphed(step),
        "select_fused": graphed(select_fused),
        "select_scores_torch_topk": graphed(select_scores_torch_topk),
        "select_two_launch": graphed(select_two_launch),
        "select_fused_dot": graphed(select_fused_dot),
        "select_two_launch_dot": graphed(select_two_launch_dot),
        "select_previous": graphed(select_previous),
        "topk_torch": graphed(topk_torch),
        "topk_triton": graphed(topk_triton),
        "topk_triton_narrow": graphed(topk_triton_narrow),
        **{name: graphed(fn) for name, fn in topk_sides.items()},
        "kernel_only": graphed(kernel_only),
        "kernel_only_merged": graphed(kernel_only_merged),
        **{name: graphed(fn) for name, fn in kernel_sides.items()},
        "flash_gathered": flash_gathered,
        "kernel_all_pages": graphed(kernel_all_pages),
        **mode_steps,
    }
    times = timed(fns, reps, flush)
    kv_bytes = 2 * b * KV_HEADS * n * HEAD_DIM * 2
    summary_bytes = summary.nbytes()
    sel_bytes = 2 * b * KV_HEADS * keep * page * HEAD_DIM * 2
    nbytes = {
        "dense_cudnn": kv_bytes,
        "dense_flash": kv_bytes,
        "page_topk_step": summary_bytes + sel_bytes,
        "page_topk_graph": summary_bytes + sel_bytes,
        "select_fused": summary_bytes,
        "select_scores_torch_topk": summary_bytes,
        "select_two_launch": summary_bytes,
        "select_fused_dot": summary_bytes,
        "select_two_launch_dot": summary_bytes,
        "select_previous": summary_bytes,
        "topk_torch": None,
        "topk_triton": None,
        "topk_triton_narrow": None,
        **dict.fromkeys(topk_sides),
        "kernel_only": sel_bytes,
        "kernel_only_merged": sel_bytes,
        **dict.fromkeys(kernel_sides, sel_bytes),
        "flash_gathered": sel_bytes,
        "kernel_all_pages": kv_bytes,
    }
    nbytes |= {name: summary_bytes + sel_bytes for name in mode_steps}
    rows = {name: row(t, nbytes[name]) for name, t in times.items()}
    dense_best = min(t.median_ms for name, t in times.items() if name.startswith("dense_"))
    speedup = {
        name: round(dense_best / times[name].median_ms, 2)
        for name in ("page_topk_step", "page_topk_graph", *mode_steps)
        if name in times
    }
    profile = kernel_profile(fns["page_topk_graph"], flush) if dev.type == "cuda" else None
    return {
        "batch": b,
        "context": n,
        "budget": budget,
        "page": page,
        "graph_kernel_profile": profile,
        "pages_kept": keep,
        "step_path": str(page_topk.fast_select_mode(b * KV_HEADS * n_pages) or "split"),
        "checks": checks,
        "times": rows,
        "speedup_vs_best_dense_median": speedup,
        "target_speedup": 8 if b >= 8 else 4,
    }


def kernel_profile(fn: Callable[[], object], flush: torch.Tensor, reps: int = 20) -> dict[str, Any]:
    """The kernels of one call of ``fn`` (a CUDA-graph replay) under torch.profiler, L2 flushed before each
    call: per kernel (in launch order) the median duration, and the median gap from the previous kernel's
    end (us); the call's span from the first kernel's start to the last one's end."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            torch.cuda.synchronize()
            fn()
            torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA" and "fill" not in e.name.lower()
         and "zero" not in e.name.lower()),
        key=lambda e: e.time_range.start,
    )  # fmt: skip
    calls: list[list[Any]] = []
    for e in kernels:  # a new call starts after a gap of > 50 us (the host synchronises between calls)
        if not calls or e.time_range.start - calls[-1][-1].time_range.end > 50:
            calls.append([])
        calls[-1].append(e)
    n_kernels = statistics.mode(len(c) for c in calls) if calls else 0
    calls = [c for c in calls if len(c) == n_kernels]
    per = []
    for i in range(n_kernels):
        per.append({
            "name": calls[0][i].name[:80],
            "median_us": round(statistics.median(c[i].time_range.elapsed_us() for c in calls), 2),
            "gap_before_us": round(statistics.median(
                c[i].time_range.start - c[i - 1].time_range.end for c in calls) if i else 0.0, 2),
        })  # fmt: skip
    span = [c[-1].time_range.end - c[0].time_range.start for c in calls]
    return {
        "calls": len(calls),
        "kernels": per,
        "span_median_us": round(statistics.median(span), 2) if span else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--context", type=int, default=131072, help="cache length N (tokens)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=4096, help="tokens attended per (batch, KV head)")
    ap.add_argument(
        "--pages", type=int, nargs="+", default=[16, 32, 64], help="page sizes of page_topk (tokens)"
    )
    ap.add_argument("--reps", type=int, default=30, help="timed calls per side (>= 10)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (a dry run)")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.context, args.batches, args.budget, args.pages, args.reps = 256, [1, 2], 64, [16], 2
        flush = torch.empty(16)
    elif not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA GPU (or --smoke)")
    else:
        flush = torch.empty(256 * 2**20 // 4, device="cuda", dtype=torch.float32)
    results: list[dict[str, Any]] = []

    def write() -> None:  # after every part, so a run cut short keeps what it measured
        out = {
            "what": "one decode step (one layer) vs dense SDPA decode; GQA 32:8, D=128, bf16, L2 flushed",
            "env": environment(flush.device),
            "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "page_topk": results,
            "page_topk_speedups": {
                f"B{r['batch']}/page{r['page']}": r["speedup_vs_best_dense_median"] for r in results
            },
            "failed_sides": FAILED,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    reps = args.reps if args.smoke else max(10, args.reps)
    with contextlib.ExitStack() as stack:
        for spec in decode_specs:
            stack.enter_context(registered(spec))
        for b in args.batches:
            for page in args.pages:
                results.append(bench_batch(b, args.context, args.budget, page, reps, flush))
                print(json.dumps(results[-1]), flush=True)
                write()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
