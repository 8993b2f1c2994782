"""The hot-path targets of issue 7 (scope 1), measured as a user calls the library, in one process.

    PYTHONPATH=$PWD ATTNLAB_COMMIT=$(git describe --always --dirty) python benchmarks/hotpath.py --out DIR
    python benchmarks/hotpath.py --device cpu --quick --out /tmp/hp       # smoke test (tests/, CI)

Sections, each guarded (a failure is recorded in its place): ``host`` (us per call at 1x8x256x64 of F.sdpa,
``op.bind`` = the backend's launch with everything resolved, ``prepare(...)(q, k, v)``, ``attnlab.attention``
and raw compiled flex, in short blocks of back-to-back calls interleaved (:func:`host_timed`); overhead =
median of the paired differences of block means against bind; targets op - bind <= 10 us, attention - bind
<= 25 us);
``first_call`` (new lengths, Triton autotuner/JIT caches, dynamo counters, the CUDA memory the allocator
obtained inside the first call: new segments ("unknown" under ``expandable_segments:True``, where a segment
grows in place), driver allocation calls and reserved growth (:func:`allocator_growth`); a new length in a
seen bucket (BUCKET_RULES) costs under 5 ms more than a warm call; before the next section, which warms
those lengths);
``as_called_vs_kernel`` (cuDNN SDPA, as called, kernel, raw flex with the same BlockMask, rounds in
carry-over-balanced orders with CUDA events after correctness checks; at 8K+ as_called / kernel and attnlab
flex / raw flex <= 1.03; from ``--order-check`` on, the three bench sides again in the bench harness's cyclic
order, and per side the median of calls right after cuDNN vs the others); ``cuda_graph`` (CUDA only: decode
through prepared ops, captured). On CPU leave TRITON_INTERPRET unset (sigmoid runs its eager backend).
Writes DIR/hotpath.json after each section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.nn.attention.flex_attention import flex_attention

import attnlab
from attnlab.kernels.flex import flex_options
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans import causal_plan
from attnlab.testing import FWD_FACTOR, bound, max_abs

Fn = Callable[[], Any]
Stats = dict[str, float]
SECTIONS = ("host", "first_call", "as_called_vs_kernel", "cuda_graph")
ROOT = Path(__file__).resolve().parents[1]
#: method -> parameters of the long-sequence configurations (as_called_vs_kernel, first_call)
KERNEL_METHODS: dict[str, dict[str, Any]] = {"softmax": {}, "sigmoid": {}, "sliding_window": {"window": 1024}}
# flex_attention's code object gets many compiled variants here (attnlab's, raw static per length and mask):
# keep dynamo from falling back to eager flex on raw calls (attnlab raises the limit around its own calls).
torch._dynamo.config.recompile_limit = 256


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def spread(ts: list[float], unit: str = "ms") -> Stats:
    s = sorted(ts)
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return {f"min_{unit}": s[0], f"median_{unit}": statistics.median(s), f"q1_{unit}": q[0],
            f"q3_{unit}": q[2], "n": len(s)}  # fmt: skip


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` functions in which every function directly follows every other one equally often
    (a Williams design: one Latin square for even ``n``, it and its mirror for odd ``n``).

    A plain rotation (a b c, b c a, c a b) keeps the cyclic order, so ``b`` follows ``a`` in almost every
    round: on the H100 the side that follows a long cuDNN call runs a few percent slower (the clock is down
    after it), which biased one side of a ratio (see ``order`` in :func:`timed`)."""
    first, lo, hi = [0], 1, n - 1
    for j in range(1, n):
        if j % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    square = [[(x + r) % n for x in first] for r in range(n)]
    return square if n % 2 == 0 else square + [row[::-1] for row in square]


def round_orders(names: list[str], order: str) -> list[list[str]]:
    """The call orders of successive rounds: ``balanced`` (:func:`balanced_orders`) or ``cyclic`` (each
    round starting one function later, the bench harness's ``measure_interleaved``)."""
    if order == "cyclic":
        return [names[r:] + names[:r] for r in range(len(names))]
    return [[names[i] for i in row] for row in balanced_orders(len(names))]


def timed(fns: dict[str, Fn], rounds: int, order: str = "balanced") -> dict[str, Any]:
    """Time per call of each function (ms) over rounds that call each once, in the orders of
    :func:`round_orders`, after two warm-up calls each, gc disabled. CUDA events around each call, no
    synchronisation inside the loop (the queue stays full, as in a model); perf_counter on CPU.

    Besides each function's spread, ``after``: for each function, the median of its calls that directly
    followed the first function (the baseline, e.g. cuDNN) and of the others (the order effect)."""
    for fn in [*fns.values()] * 2:  # compiles, caches
        fn()
    sync()
    names, events = list(fns), DEV.type == "cuda"
    orders = round_orders(names, order)
    marks: dict[str, list[Any]] = {n: [] for n in names}
    after_first: dict[str, list[bool]] = {n: [] for n in names}
    prev = None
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in orders[r % len(orders)]:
                fn = fns[name]
                after_first[name].append(prev == names[0])
                prev = name
                if events:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    marks[name].append((start, end))
                    continue
                t = time.perf_counter()
                fn()
                marks[name].append((time.perf_counter() - t) * 1e3)
    finally:
        gc.enable()
    sync()
    as_num = lambda m: m[0].elapsed_time(m[1]) if isinstance(m, tuple) else m
    out: dict[str, Any] = {}
    for n, ms in marks.items():
        ts = [as_num(m) for m in ms]
        after = [t for t, a in zip(ts, after_first[n], strict=True) if a]
        rest = [t for t, a in zip(ts, after_first[n], strict=True) if not a]
        out[n] = {**spread(ts), "order": order,
                  "after_first": {"n": len(after), "median_ms": statistics.median(after) if after else None},
                  "not_after_first": {"n": len(rest), "median_ms": statistics.median(rest) if rest else None}}  # fmt: skip
    return out


def host_timed(
    fns: dict[str, Fn], rounds: int, iterations: int, block: int
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Host time per call (us) of each function: in each round, ``iterations`` iterations that run every
    function for a block of ``block`` back-to-back calls (in that round's :func:`balanced_orders` order;
    perf_counter around the block, its mean recorded), gc disabled throughout (collected before), the
    device synchronised at the end of each round only.

    Why blocks, interleaved: block means of 200 calls per function and round varied by +-40% between
    rounds on the H100's host (524361e), so a difference of their medians (the overhead) came out anywhere
    between 0 and 50 us; single calls interleaved one by one (5cd491b) run with cold caches, 2-3x slower
    than back to back and with quartiles 50 us apart. Short blocks keep the calls warm, and adjacent blocks
    see the same machine state: ``paired`` differences of the blocks of one iteration are the overhead
    estimate. Returns each function's spread of block means, and the block means per function."""
    for fn in [*fns.values()] * 3:
        fn()
    sync()
    names = list(fns)
    orders = round_orders(names, "balanced")
    per: dict[str, list[float]] = {n: [] for n in names}
    clock, calls = time.perf_counter_ns, range(block)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = [(fns[n], per[n]) for n in orders[r % len(orders)]]
            for _ in range(iterations):
                for fn, sink in order:
                    t = clock()
                    for _ in calls:
                        fn()
                    sink.append((clock() - t) / 1e3 / block)
            sync()
    finally:
        gc.enable()
    stats = {n: {**spread(ts, "us"), "rounds": rounds, "iterations": iterations, "block": block}
             for n, ts in per.items()}  # fmt: skip
    return stats, per


def paired(a: list[float], b: list[float]) -> Stats:
    """Spread of the differences a_i - b_i of block means of the same iteration (:func:`host_timed`, us)."""
    return spread([x - y for x, y in zip(a, b, strict=True)], "us")


def dynamo_counters() -> dict[str, int]:
    c = torch._dynamo.utils.counters
    return {f"{k}.{kk}": int(vv) for k in c for kk, vv in c[k].items()}


def triton_caches() -> dict[str, int | None]:
    """Sizes of the sigmoid forward's autotuner cache (one per tuning key) and its kernel's JIT cache."""
    mod = sys.modules.get("attnlab.kernels.sigmoid.op")
    if mod is None:
        return {"autotuner": None, "jit": None}
    fn: Any = mod._FWD[0]
    while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):  # autotuner -> heuristics -> jit
        fn = fn.fn
    caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", None) or {}
    jit = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
    return {"autotuner": len(mod._FWD[0].cache), "jit": jit}


def agree(out: Tensor, other: Tensor, ulps: float) -> dict[str, Any]:
    """The same result up to rounding: max |a - b| <= ulps * eps(dtype) * max |b|."""
    err = float((out.float() - other.float()).abs().max())
    tol = ulps * torch.finfo(out.dtype).eps * float(other.float().abs().max())
    return {"max_abs": err, "tol": tol, "exact": bool(torch.equal(out, other)), "passed": err <= tol,
            "rule": f"max|a-b| <= {ulps} eps(dtype) max|b|"}  # fmt: skip


def vs_reference(m: str, params: dict[str, Any], causal: bool, qkv: tuple[Tensor, ...], out: Tensor) -> Any:
    """The as-called output on a 2-head slice against ``backend="reference"`` (fp32), under the project's
    rule: at most 2x the error of the same math in the input precision (attnlab.testing)."""
    q, k, v = (t[:, :2] for t in qkv)
    spec = attnlab.get(m)
    ref = attnlab.attention(q, k, v, method=m, causal=causal, backend="reference", **params)
    low = spec.reference(q, k, v, spec.make_params(params), causal=causal, scale=q.shape[-1] ** -0.5,
                         upcast=False)  # fmt: skip
    err, tol = max_abs(out[:, :2], ref), bound(max_abs(low, ref), ref, FWD_FACTOR, q.dtype)
    return {"max_abs": err, "tol": tol, "passed": err <= tol, "rule": "attnlab.testing, 2 heads"}


def section_host() -> dict[str, Any]:
    q, k, v = (randn(1, 8, 256, 64) for _ in range(3))
    methods: dict[str, dict[str, Any]] = {"softmax": {}, "sliding_window": {"window": 64}, "sigmoid": {}}
    fns: dict[str, Fn] = {"sdpa": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)}
    for m, params in methods.items():
        op = attnlab.prepare(m, causal=True, **params)
        fns[f"{m}.bind"] = op.bind(q, k, v)
        fns[f"{m}.op"] = partial(op, q, k, v)
        fns[f"{m}.attention"] = partial(attnlab.attention, q, k, v, method=m, causal=True, **params)
    res = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=64, return_plan=True)
    assert isinstance(res, attnlab.Result) and res.plan is not None
    kw = {"block_mask": res.plan.block_mask(), "scale": 64**-0.5, **flex_options(256, 256, False, DEV)}
    fns["sliding_window.raw_flex"] = partial(torch.compile(flex_attention, dynamic=True), q, k, v, **kw)
    t, per = host_timed(fns, ARGS.host_rounds, ARGS.host_calls, ARGS.host_block)
    derived: dict[str, Any] = {}
    for m in methods:
        bind = per[f"{m}.bind"]
        for side in ("op", "attention"):
            d = paired(per[f"{m}.{side}"], bind)
            derived[f"{m}.overhead_{side}_us"] = d  # call-by-call differences: the estimate
            derived[f"{m}.overhead_{side}_median_us"] = d["median_us"]
            derived[f"{m}.overhead_{side}_diff_of_medians_us"] = (
                t[f"{m}.{side}"]["median_us"] - t[f"{m}.bind"]["median_us"]
            )
        derived[f"{m}.meets_op_10us"] = derived[f"{m}.overhead_op_median_us"] <= 10
        derived[f"{m}.meets_attention_25us"] = derived[f"{m}.overhead_attention_median_us"] <= 25
    raw = paired(per["sliding_window.bind"], per["sliding_window.raw_flex"])
    derived["sliding_window.bind_minus_raw_flex_median_us"] = raw["median_us"]
    return {"shape": [1, 8, 256, 64], "dtype": str(DT), "causal": True, "us_per_call": t, "derived": derived,
            "method": "blocks of back-to-back calls, interleaved (host_timed); overhead = median of paired "
            "differences of block means"}  # fmt: skip


#: What selects a compiled variant, i.e. what makes a length a "new bucket" (anything else is the same
#: compiled code at a new length; its first call pays the plan and BlockMask, or nothing for sigmoid).
BUCKET_RULES = {
    "sliding_window": "FlexAttention compiled with dynamic=True: one variant per (dtype, head dim, GQA, mask "
    "function) and IS_DIVISIBLE (both lengths multiples of 128, kernels/flex.py flex_options); a length "
    "with the other divisibility recompiles once (seconds), lengths otherwise symbolic",
    "sigmoid": "Triton autotuning key (head dim, causal, precision, N_BUCKET, GQA, TMA): N_BUCKET = next "
    "power of two of the longer side up to 8192, 16384 when both sides >= 8192 (kernels/sigmoid/op.py "
    "_bucket); the JIT cache also keys on Triton's specialisation of integer arguments",
}


def bucket_of(m: str, n: int) -> Any:
    """The compiled-variant bucket of a self-attention length (BUCKET_RULES); None for cuDNN SDPA."""
    if m == "sdpa":
        return None
    if m == "sigmoid":
        mod = sys.modules.get("attnlab.kernels.sigmoid.op")
        return f"N_BUCKET={mod._bucket(n, n)}" if mod is not None else None
    divisible = flex_options(n, n, False, DEV)["kernel_options"].get("IS_DIVISIBLE", False)
    return "IS_DIVISIBLE" if divisible else "bounds-checked"


def gc_collections() -> int:
    """Python's cyclic-GC collections so far, all generations (a collection inside a timed first call costs
    milliseconds with torch, Triton and inductor loaded; the first-call rows record how many ran)."""
    return sum(s["collections"] for s in gc.get_stats())


#: ``torch.cuda.memory_stats()`` keys the first-call rows compare before and after a call
ALLOC_KEYS = ("segment.all.allocated", "num_device_alloc", "reserved_bytes.all.current")


def allocator_conf() -> str:
    """The CUDA caching allocator's settings from the environment (``PYTORCH_CUDA_ALLOC_CONF``, or the newer
    ``PYTORCH_ALLOC_CONF``); "" when neither is set."""
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or ""


def expandable_segments(conf: str) -> bool:
    """Whether an allocator configuration string turns on expandable segments
    (``expandable_segments:True`` among its comma-separated options)."""
    for option in conf.split(","):
        key, _, value = option.partition(":")
        if key.strip() == "expandable_segments":
            return value.strip().lower() in ("true", "1")
    return False


def allocator_counts() -> dict[str, int | None]:
    """The :data:`ALLOC_KEYS` of ``torch.cuda.memory_stats()`` now (None for a key this torch lacks); every
    count 0 on a CPU run (nothing is allocated on a GPU there)."""
    if DEV.type != "cuda":
        return dict.fromkeys(ALLOC_KEYS, 0)
    stats = torch.cuda.memory_stats()
    return {k: (int(stats[k]) if k in stats else None) for k in ALLOC_KEYS}


def allocator_growth(
    before: dict[str, int | None], after: dict[str, int | None], expandable: bool
) -> dict[str, Any]:
    """What the CUDA caching allocator obtained from the driver between two :func:`allocator_counts`:

    - ``device_allocs``: driver allocation calls (``num_device_alloc``: cudaMalloc, and cuMemMap under
      expandable segments; milliseconds each for large ones); None when this torch does not count them;
    - ``reserved_mb``: growth of the memory reserved from the driver (MiB; either mode);
    - ``segments``: new segments (``segment.all.allocated``), or "unknown" under expandable segments, where
      one segment grows in place and the count stays put whatever is mapped.
    """

    def diff(key: str) -> int | None:
        a, b = before.get(key), after.get(key)
        return None if a is None or b is None else b - a

    reserved = diff("reserved_bytes.all.current")
    return {
        "segments": "unknown" if expandable else diff("segment.all.allocated"),
        "device_allocs": diff("num_device_alloc"),
        "reserved_mb": None if reserved is None else reserved / 2**20,
    }


def section_first_call() -> dict[str, Any]:
    lengths = [256, 320, 384] if ARGS.quick else [int(x) for x in ARGS.first_lengths.split(",")]
    heads, d = (8, 64) if ARGS.quick else (32, 128)
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    conf = allocator_conf()
    expandable = expandable_segments(conf)
    for n in lengths:
        q, k, v = (randn(1, heads, n, d) for _ in range(3))
        for m in ("sigmoid", "sliding_window", "sdpa"):  # sdpa (cuDNN, after ours): no bucket, for scale
            call = (
                partial(sdpa_dense, q, k, v, causal=True, scale=d**-0.5,
                        kernels=[SDPBackend.CUDNN_ATTENTION] if DEV.type == "cuda" else None)
                if m == "sdpa"
                else partial(attnlab.attention, q, k, v, method=m, causal=True, **KERNEL_METHODS[m])
            )  # fmt: skip
            before_c, before_t, times, gc_runs, allocs = dynamo_counters(), triton_caches(), [], [], []
            for _ in range(3):  # the first call, then warm ones: seconds, synchronised
                sync()
                gc0, alloc0 = gc_collections(), allocator_counts()
                t0 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t0)
                gc_runs.append(gc_collections() - gc0)
                allocs.append(allocator_growth(alloc0, allocator_counts(), expandable))
            first, second = times[0], min(times[1:])
            after_t, after_c = triton_caches(), dynamo_counters()
            bucket = bucket_of(m, n)  # after the call: the sigmoid module is imported by then
            row = {"method": m, "n": n, "first_s": first, "second_s": second, "bucket": bucket,
                   "gc_in_first_call": gc_runs[0], "cuda_segments_in_first_call": allocs[0]["segments"],
                   "cuda_device_allocs_in_first_call": allocs[0]["device_allocs"],
                   "cuda_reserved_mb_in_first_call": allocs[0]["reserved_mb"],
                   "new_length": (m, n) not in seen, "seen_bucket": (m, "bucket", bucket) in seen,
                   "triton_before": before_t, "triton_after": after_t,
                   "autotuner_grew": (after_t["autotuner"] or 0) > (before_t["autotuner"] or 0),
                   "jit_cache_grew": (after_t["jit"] or 0) > (before_t["jit"] or 0),
                   "dynamo": {k: v - before_c.get(k, 0) for k, v in after_c.items()
                              if v != before_c.get(k, 0)}}  # fmt: skip
            if row["new_length"] and row["seen_bucket"] and bucket is not None:  # None: no kernel
                row["meets_5ms"] = first - second < 0.005  # the extra cost of the first call
            seen |= {(m, n), (m, "bucket", bucket)}
            rows.append(row)
        del q, k, v
    parts = [first_call_parts(n, heads, d) for n in ([448] if ARGS.quick else [8448, 33024, 66048])]
    return {"heads": heads, "head_dim": d, "dtype": str(DT), "causal": True, "rows": rows,
            "bucket_rules": BUCKET_RULES, "warm": "the fastest of the next two calls", "parts": parts,
            "allocator_conf": conf, "expandable_segments": expandable}  # fmt: skip


def first_call_parts(n: int, heads: int, d: int) -> dict[str, Any]:
    """Where the first call of sliding_window at a new length (in a seen bucket) spends its time, piece
    by piece, each synchronised (ms): resolving the call (validation, dispatch), the static plan, its tables,
    its BlockMask, then the call itself (the rest: flex's guards, allocation, the kernel) and a warm call."""
    from attnlab.plans import static_plan

    q, k, v = (randn(1, heads, n, d) for _ in range(3))
    op = attnlab.prepare("sliding_window", causal=True, **KERNEL_METHODS["sliding_window"])
    ms: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        ms[name] = (time.perf_counter() - t0) * 1e3
        return out

    call, _ = step("resolve", lambda: op.resolve(q, k, v))
    p = call.problem
    plan = step("plan", lambda: static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device))
    step("tables", plan.tables)
    step("block_mask", plan.block_mask)
    step("call", lambda: op(q, k, v))
    step("warm_call", lambda: op(q, k, v))
    return {"method": "sliding_window", "n": n, "ms": ms, "bucket": bucket_of("sliding_window", n)}


def one_config(
    n: int, causal: bool, m: str, raw_dyn: Callable[..., Any], raw_static: Callable[..., Any]
) -> dict[str, Any]:
    heads, d = (8, 64) if ARGS.quick else (32, 128)
    params, scale = KERNEL_METHODS[m], d**-0.5
    torch.manual_seed(0)
    q, k, v = qkv = tuple(randn(1, heads, n, d) for _ in range(3))
    as_called = partial(attnlab.attention, q, k, v, method=m, causal=causal, **params)
    out = as_called()
    kernels = [SDPBackend.CUDNN_ATTENTION] if DEV.type == "cuda" else None
    fns: dict[str, Fn] = {
        "sdpa": partial(sdpa_dense, q, k, v, causal=causal, scale=scale, kernels=kernels),
        "as_called": as_called,
        "kernel": attnlab.prepare(m, causal=causal, **params).bind(q, k, v),
    }
    checks: dict[str, Any] = {}
    if m == "sliding_window" or (m == "softmax" and not ARGS.quick):  # quick: fewer compilations
        res = as_called(return_plan=True) if m == "sliding_window" else None
        plan = res.plan if isinstance(res, attnlab.Result) else causal_plan(n, n, DEV) if causal else None
        kw = {"block_mask": plan.block_mask() if plan else None, "scale": scale,
              **flex_options(n, n, False, DEV)}  # fmt: skip
        checks["vs_raw_flex"] = agree(out, raw_dyn(q, k, v, **kw), ulps=2)
        if m == "sliding_window":
            fns["raw_flex_dynamic"] = partial(raw_dyn, q, k, v, **kw)
            if not ARGS.quick:  # a compile per length and mask: too slow for the CPU smoke test
                fns["raw_flex_static"] = partial(raw_static, q, k, v, **kw)
    if m == "sigmoid" and DEV.type == "cuda":
        checks["vs_flex_backend"] = agree(out, as_called(backend="flex"), ulps=4)
    if n <= 8192:
        checks["vs_reference_2heads"] = vs_reference(m, params, causal, qkv, out)
    t = timed(fns, ARGS.reps)
    if n >= ARGS.order_check:  # the bench harness's order (cyclic rotation) of its three sides, again
        three = {name: fns[name] for name in ("sdpa", "as_called", "kernel")}
        cyc = timed(three, ARGS.reps, order="cyclic")
        t |= {f"{name}.cyclic": st for name, st in cyc.items()}
    med = {name: s["median_ms"] for name, s in t.items()}
    derived: dict[str, Any] = {f"{a}_over_{b}": med[a] / med[b] for a in ("as_called", "kernel")
                               for b in ("kernel", "raw_flex_dynamic", "raw_flex_static")
                               if a != b and b in med}  # fmt: skip
    derived |= {f"speedup_vs_sdpa_{a}": med["sdpa"] / med[a] for a in ("as_called", "kernel")}
    if "as_called.cyclic" in med:
        derived["as_called_over_kernel_cyclic"] = med["as_called.cyclic"] / med["kernel.cyclic"]
    targets = ("as_called_over_kernel", "kernel_over_raw_flex_dynamic", "kernel_over_raw_flex_static")
    derived |= {f"meets_{k}_1.03": derived[k] <= 1.03 for k in targets if k in derived and n >= 8192}
    backend = attnlab.explain(q, k, v, method=m, causal=causal, **params).backend
    return {"n": n, "causal": causal, "method": m, "params": params, "heads": heads, "head_dim": d,
            "dtype": str(DT), "backend": getattr(backend, "name", None),
            "baseline": "cuDNN SDPA" if kernels else "SDPA (CPU)", "checks": checks,
            "correct": all(c["passed"] for c in checks.values()),
            "timing": t, "derived": derived}  # fmt: skip


def section_as_called_vs_kernel() -> dict[str, Any]:
    raw_dyn = torch.compile(flex_attention, dynamic=True)
    raw_static = torch.compile(flex_attention, dynamic=False)
    configs: dict[str, Any] = {}
    for n in [512] if ARGS.quick else [int(x) for x in ARGS.lengths.split(",")]:
        for causal in (True, False):
            for m in KERNEL_METHODS:
                tag = f"{m}_N{n}_{'causal' if causal else 'noncausal'}"
                configs[tag] = guarded(lambda: one_config(n, causal, m, raw_dyn, raw_static))  # noqa: B023
                torch.cuda.empty_cache()  # (nothing on CPU)
    return {"configs": configs}


def section_cuda_graph() -> dict[str, Any]:
    if DEV.type != "cuda":
        return {"error": "CUDA only (torch.cuda.graph): skipped on this device"}
    from torch.nn.attention.bias import causal_lower_right

    n_k, heads, kv_heads, d = 131072, 32, 8, 128
    k, v = randn(1, kv_heads, n_k, d), randn(1, kv_heads, n_k, d)
    ops = {"softmax": attnlab.prepare("softmax", causal=True),
           "sliding_window": attnlab.prepare("sliding_window", causal=True, window=4096),
           "sigmoid": attnlab.prepare("sigmoid", causal=True)}  # fmt: skip

    def case(op: attnlab.Op, q: Tensor, sdpa: Fn) -> dict[str, Any]:
        eager = op(q, k, v)  # warm-up: resolves this signature (plan, compiled kernel)
        side = torch.cuda.Stream()  # and once on a side stream, as torch.cuda.graph's docs advise
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op(q, k, v)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(q, k, v)
        graph.replay()
        sync()
        assert isinstance(eager, Tensor) and isinstance(captured, Tensor)
        fns: dict[str, Fn] = {"eager": partial(op, q, k, v), "replay": graph.replay, "sdpa_direct": sdpa}
        return {"captured": True, "replay_equals_eager": bool(torch.equal(captured, eager)),
                "timing": timed(fns, max(ARGS.reps, 20))}  # fmt: skip

    cases: dict[str, Any] = {}
    for nq in (1, 16):  # the last query sits at the last key: N_q = 1 needs no mask
        q = randn(1, heads, nq, d)
        mask = causal_lower_right(nq, n_k) if nq > 1 else None
        sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=True)
        for name, op in ops.items():
            cases[f"{name}_nq{nq}"] = guarded(partial(case, op, q, sdpa))
    return {"n_k": n_k, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "dtype": str(DT), "cases": cases}


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}


def environment() -> dict[str, Any]:
    """The commit (ATTNLAB_COMMIT in the environment, else a file of that name at the repository root,
    else ``git describe --always --dirty``), versions and the device."""
    file, git = ROOT / "ATTNLAB_COMMIT", "git describe --always --dirty"
    commit, source = os.environ.get("ATTNLAB_COMMIT", ""), "env ATTNLAB_COMMIT"
    if not commit and file.exists():
        commit, source = file.read_text().strip(), "file ATTNLAB_COMMIT"
    if not commit:
        out = subprocess.run(git.split(), cwd=ROOT, capture_output=True, text=True)
        commit, source = out.stdout.strip() or f"unknown ({out.stderr.strip()[:200]})", git
    gpu = torch.cuda.get_device_name() if DEV.type == "cuda" else None
    return {"commit": commit, "commit_source": source, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton") if find_spec("triton") else None, "python": platform.python_version(),
            "device": gpu or platform.processor() or "cpu", "cudnn": gpu and torch.backends.cudnn.version(),
            "argv": sys.argv, "quick": ARGS.quick, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def summary(res: dict[str, Any]) -> None:
    print(f"\n== hotpath at {res['env']['commit']} on {res['env']['device']} ({DT})")
    host = res.get("host", {})
    for name, st in host.get("us_per_call", {}).items():
        print(f"host {name:26s} {st['median_us']:9.1f} us (min {st['min_us']:.1f})")
    for m in ("softmax", "sliding_window", "sigmoid") if "derived" in host else ():
        dv = {k.split(".")[1]: v for k, v in host["derived"].items() if k.startswith(m + ".")}
        print(f"host {m:15s} op-bind {dv['overhead_op_median_us']:7.1f} us (<=10 {dv['meets_op_10us']}), "
              f"attn-bind {dv['overhead_attention_median_us']:7.1f} us (<=25 {dv['meets_attention_25us']})")  # fmt: skip
    for r in res.get("first_call", {}).get("rows", []):
        ms = r["first_s"] * 1e3, r["second_s"] * 1e3
        print(f"first {r['method']:15s} N={r['n']:6d} {ms[0]:9.1f} ms then {ms[1]:.2f}; bucket={r['bucket']} "
              f"autotune+={r['autotuner_grew']} jit+={r['jit_cache_grew']} 5ms={r.get('meets_5ms', '-')}")  # fmt: skip
    sides = ("sdpa", "as_called", "kernel", "raw_flex_dynamic", "raw_flex_static")
    print(f"{'median ms':30s}" + "".join(f"{s[:9]:>10s}" for s in sides) + "  called/kernel  correct")
    for tag, c in res.get("as_called_vs_kernel", {}).get("configs", {}).items():
        if "error" in c:
            print(f"{tag:30s} ERROR {c['error'][:90]}")
            continue
        cells = "".join(f"{c['timing'][s]['median_ms']:10.3f}" if s in c["timing"] else f"{'-':>10s}"
                        for s in sides)  # fmt: skip
        cyc = c["derived"].get("as_called_over_kernel_cyclic")
        print(f"{tag:30s}{cells}  {c['derived']['as_called_over_kernel']:13.3f}  {c['correct']}"
              + (f"  (cyclic order: {cyc:.3f})" if cyc is not None else ""))  # fmt: skip
    for name, c in res.get("cuda_graph", {}).get("cases", {}).items():
        t = {k: f"{st['median_ms'] * 1e3:.1f} us" for k, st in c.get("timing", {}).items()}
        print(f"graph {name:20s}", f"ERROR {c['error'][:90]}" if "error" in c
              else f"equal={c['replay_equals_eager']} {t}")  # fmt: skip
    for name in (name for name in SECTIONS if "error" in res.get(name, {})):
        print(f"{name}: {res[name]['error'][:200]}")


def main() -> None:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"env": environment(), "section_seconds": {}}
    for name in ARGS.sections.split(","):
        print(f"section {name}", flush=True)
        t = time.perf_counter()
        res[name] = guarded(globals()[f"section_{name}"])
        res["section_seconds"][name] = round(time.perf_counter() - t, 2)
        (out / "hotpath.json").write_text(json.dumps(res, indent=1, default=str))
    summary(res)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="hotpath_out", help="folder for hotpath.json")
    ap.add_argument("--quick", action="store_true", help="small shapes and counts (CPU smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    ap.add_argument("--lengths", default="8192,16384,32768,65536", help="as_called_vs_kernel lengths")
    ap.add_argument("--first-lengths", default="8192,8320,12288,16384,16400,20008,32768,32896,65536,65664,65792,8192",
                    help="first_call lengths, in this order (non-quick)")  # fmt: skip
    ap.add_argument("--order-check", type=int, default=65536,
                    help="from this length on, also time the bench harness's cyclic order")  # fmt: skip
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per point (quick: 6)")
    ap.add_argument("--host-calls", type=int, default=40, help="iterations per host round (quick: 5)")
    ap.add_argument("--host-block", type=int, default=10, help="back-to-back calls per block (quick: 2)")
    ap.add_argument("--host-rounds", type=int, default=10, help="host rounds (quick: 3)")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.host_calls, args.host_rounds, args.order_check, args.host_block = 6, 5, 3, 512, 2
    if set(args.sections.split(",")) - set(SECTIONS):
        ap.error(f"--sections: choose from {SECTIONS}")
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    DEV = torch.device(ARGS.device)
    DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    randn = lambda *shape: torch.randn(*shape, device=DEV, dtype=DT)
    main()
