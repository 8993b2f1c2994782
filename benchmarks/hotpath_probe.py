"""Why is attnlab's call path slower than the kernels it calls? (issue 7, scope 1: the hot path)

    PYTHONPATH=$PWD ATTNLAB_COMMIT=<sha> python benchmarks/hotpath_probe.py --out DIR      # H100
    python benchmarks/hotpath_probe.py --device cpu --quick --out /tmp/probe               # smoke test

One process, sections guarded one by one (a failure is recorded and the rest goes on):

- ``flex``: sliding window (attnlab convention: keys with 0 <= p - j < W, causal) at N=32K/W=1024 and
  N=64K/W=2048, B=1, H=32, D=128, bf16. cuDNN SDPA against raw ``torch.compile(flex_attention)`` in a
  2 x 2 design {static, dynamic compile} x {Python-int mask (``create_block_mask``), attnlab's BlockMask
  (tensor-captured window/offset, ``attnlab.kernels.flex.cached_block_mask``)}, plus attnlab's block layout
  with the Python-int mask_mod (separates block structure from parameter capture), the dynamic compile with
  ``kernel_options={"IS_DIVISIBLE": True}``, attnlab's compiled function called directly, ``flex_run`` and
  ``attnlab.attention`` (check_finite off and default). Interleaved rotating rounds with CUDA events; the
  variant that synchronises (check_finite=True) is timed in a second group so it cannot drain the queue
  of the kernel-only group. Also: first-call (compile) times, dynamo counters, the generated Triton
  template's constexprs (IS_DIVISIBLE, BLOCK_M/N, ...), the BlockMasks' block counts, per-variant CUDA
  kernel lists from the profiler.
- ``host``: host time per call (1x8x256x64, 200 back-to-back calls, synchronised at the ends only) of
  SDPA, raw flex, attnlab's pieces and ``attnlab.attention`` for softmax / sliding_window / sigmoid;
  cProfile of the attnlab calls.
- ``sigmoid_first``: first call of ``attnlab.attention(method="sigmoid", causal=True, check_finite=False)``
  at a sequence of lengths, each classified as autotuning (autotuner benchmarked configs), JIT compilation
  (the kernel cache grew) or neither.
- ``sigmoid_dns``: the same forward kernel re-jitted with ``do_not_specialize`` on N_Q/N_K/OFFSET (and,
  second variant, EVEN_M/EVEN_N pinned where TMA makes them dead): recompiles per new length, outputs, and
  kernel time at 16K/32K interleaved with the original.
- ``graph``: decode shapes (N_q 1 and 16, N_k 128K, GQA 32:8) through ``attnlab.attention``: CUDA-graph
  capture, replay correctness against an eager call, eager vs replay time; then the failure modes (cold
  BlockMask cache during capture, check_finite=True during capture).

Nothing in attnlab is modified: alternatives are built here. Results: ``hotpath_probe.json`` and
``hotpath_probe.log`` under ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()


def _early_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="hotpath_probe_out")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument(
        "--sections", default="flex32,host,sigmoid_first,sigmoid_dns,graph,flex64,graph_fail,host2,decode_alt"
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this")
    ap.add_argument("--reps", type=int, default=30)
    return ap.parse_args()


ARGS = _early_args()
OUT = Path(ARGS.out)
OUT.mkdir(parents=True, exist_ok=True)
# A fresh inductor cache, so that the generated kernels of this run can be read back (and no earlier
# run's cache shortens the compile times measured here).
INDUCTOR_DIR = Path(f"/tmp/hotpath_inductor_{os.getpid()}")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(INDUCTOR_DIR)
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the sigmoid kernels run in Triton's interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: E402

import attnlab  # noqa: E402
from attnlab.api import resolve  # noqa: E402
from attnlab.dispatch import choose  # noqa: E402
from attnlab.inputs import validate  # noqa: E402
from attnlab.kernels import flex as aflex  # noqa: E402
from attnlab.kernels.sdpa import SDPA_PRIORITY as SDPA_ORDER  # noqa: E402
from attnlab.kernels.sdpa import sdpa_dense  # noqa: E402
from attnlab.kernels.sigmoid import op as sop  # noqa: E402
from attnlab.kernels.sigmoid.fwd import sigmoid_fwd_kernel  # noqa: E402
from attnlab.kernels.triton_utils import descriptor_scratch, head_block  # noqa: E402
from attnlab.masks import MaskContext  # noqa: E402

DEV = torch.device(ARGS.device)
CUDA = DEV.type == "cuda"
DT = torch.bfloat16
RESULTS: dict[str, Any] = {"errors": {}, "notes": []}
LOG = open(OUT / "hotpath_probe.log", "w")  # noqa: SIM115

# Many compiled variants of flex_attention live in one process here (static/dynamic x masks x lengths):
# keep dynamo from falling back to eager flex (O(N^2) memory) when the per-code-object limit is reached.
torch._dynamo.config.recompile_limit = 256
if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
    torch._dynamo.config.accumulated_recompile_limit = 4096


def log(*a: Any) -> None:
    msg = " ".join(str(x) for x in a)
    line = f"[{time.perf_counter() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def save() -> None:
    (OUT / "hotpath_probe.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def elapsed() -> float:
    return time.perf_counter() - _T0


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def record_error(where: str, e: BaseException) -> None:
    tb = traceback.format_exc()
    RESULTS["errors"][where] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-4000:]}
    log(f"ERROR in {where}: {type(e).__name__}: {str(e)[:500]}")


def guarded(where: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        record_error(where, e)
        return None


# ----------------------------------------------------------------------------------------------- timing
def _stats(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_ms": statistics.median(s), "min_ms": s[0], "q1_ms": q[0], "q3_ms": q[2], "n": len(s)}


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """attnlab.bench.timing.measure_interleaved's scheme with a fixed count and the spread: every round calls
    every function once, each round starting one function later; CUDA events, no sync inside the loop."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    events: dict[str, list[tuple[Any, Any]]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if CUDA:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fns[name]()
                e.record()
                events[name].append((s, e))
            else:
                t = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
    sync()
    if CUDA:
        times = {n: [s.elapsed_time(e) for s, e in ev] for n, ev in events.items()}
    return {n: _stats(ts) for n, ts in times.items()}


def wall_per_call_ms(fn: Callable[[], Any], calls: int) -> float:
    """Back-to-back calls, synchronised only at the ends: the as-called throughput time per call."""
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) * 1e3 / calls


def _flat_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {f"{k}.{kk}": int(vv) for k, c in counters.items() for kk, vv in c.items()}


def _counter_delta(before: dict[str, int]) -> dict[str, int]:
    after = _flat_counters()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


_SEEN_KERNEL_FILES: set[str] = set()
_DEFINE_NAMES = (
    "IS_DIVISIBLE", "BLOCK_M", "BLOCK_N", "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "HAS_FULL_BLOCKS",
    "USE_TMA", "SAFE_HEAD_DIM", "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "FLOAT32_PRECISION",
    "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "QK_HEAD_DIM", "V_HEAD_DIM", "GQA_SHARED_HEADS", "SM_SCALE",
)  # fmt: skip


def new_flex_kernels() -> list[dict[str, str]]:
    """Constexprs of the flex templates inductor generated since the last call (new files in the cache)."""
    found = []
    if not INDUCTOR_DIR.exists():
        return found
    for p in INDUCTOR_DIR.rglob("*.py"):
        sp = str(p)
        if sp in _SEEN_KERNEL_FILES:
            continue
        _SEEN_KERNEL_FILES.add(sp)
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        if "IS_DIVISIBLE : tl.constexpr" not in text and "IS_DIVISIBLE: tl.constexpr" not in text:
            continue
        defs = {}
        for m in re.finditer(r"^\s*(\w+)\s*:\s*tl\.constexpr\s*=\s*(.+)$", text, re.M):
            if m.group(1) in _DEFINE_NAMES:
                defs[m.group(1)] = m.group(2).strip()
        m = re.search(r"num_stages=(\d+), num_warps=(\d+)", text)
        if m:
            defs["num_stages"], defs["num_warps"] = m.group(1), m.group(2)
        defs["file"] = p.name
        found.append(defs)
    return found


def first_call(name: str, fn: Callable[[], Any], store: dict) -> Any:
    """Time the first call (compilation included) and record what dynamo and inductor did."""
    before = _flat_counters()
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    dt = time.perf_counter() - t
    kernels = new_flex_kernels()
    store[name] = {
        "first_call_s": round(dt, 4),
        "dynamo_counters": _counter_delta(before),
        "new_flex_kernels": kernels,
    }
    div = sorted({k.get("IS_DIVISIBLE", "?") for k in kernels})
    log(f"  first call {name}: {dt:.2f} s, new flex kernels {len(kernels)} IS_DIVISIBLE={div}")
    return out


def profile_kernels(fn: Callable[[], Any], calls: int = 3) -> list[dict[str, Any]]:
    """The device kernels one call launches (profiler): name, launches per call, device us per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if dev_us and dev_us > 0:
            rows.append(
                {"name": ev.key[:120], "per_call": ev.count / calls, "device_us_per_call": dev_us / calls}
            )
    rows.sort(key=lambda r: -r["device_us_per_call"])
    return rows[:12]


# ------------------------------------------------------------------------------------- block masks
def sliding_int_mask(window: int) -> Callable:
    def sliding_int(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < window)

    return sliding_int


def attnlab_block_mask(n: int, window: int) -> BlockMask:
    """The BlockMask attnlab.attention(method='sliding_window', causal=True) uses: same cache key as the flex
    backend (attnlab/backends/flex.py), so the library call hits this very entry."""
    spec = attnlab.get("sliding_window")
    params = spec.make_params({"window": window})
    key = (spec.name, params.key(), True)
    make = lambda: spec.mask(params, MaskContext(n, n, True, DEV))
    bm, _ = aflex.cached_block_mask(key, make, n, n, DEV)
    return bm


def describe_bm(bm: BlockMask) -> dict[str, Any]:
    d: dict[str, Any] = {
        "BLOCK_SIZE": list(bm.BLOCK_SIZE),
        "seq_lengths": list(getattr(bm, "seq_lengths", ())),
    }
    for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
        t = getattr(bm, f, None)
        if t is None:
            d[f] = None
            continue
        d[f] = {"shape": list(t.shape), "dtype": str(t.dtype), "contiguous": t.is_contiguous()}
        if "num" in f:
            d[f]["sum"] = int(t.sum())
            d[f]["max"] = int(t.max())
    return d


def same_blocks(a: BlockMask, b: BlockMask) -> dict[str, bool]:
    def valid_idx(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(idx.shape[-1], device=idx.device)
        return torch.where(cols < num[..., None], idx, -1)

    res = {}
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        na, nb = getattr(a, num), getattr(b, num)
        if na is None or nb is None:
            res[num] = na is None and nb is None
            continue
        res[num] = bool(torch.equal(na.cpu(), nb.cpu()))
        ia, ib = valid_idx(na, getattr(a, idx)), valid_idx(nb, getattr(b, idx))
        w = min(ia.shape[-1], ib.shape[-1])
        res[idx] = bool(torch.equal(ia[..., :w].cpu(), ib[..., :w].cpu()))
    return res


# --------------------------------------------------------------------------------------------- flex
STATIC = torch.compile(flex_attention, dynamic=False)
DYNAMIC = torch.compile(flex_attention, dynamic=True)
ATTNLAB_KW = {"kernel_options": {"FORCE_USE_FLEX_ATTENTION": True}}


def section_flex(n: int, window: int, heads: int, d: int, reps: int) -> None:
    tag = f"flex_N{n}_W{window}"
    res: dict[str, Any] = {"n": n, "window": window, "heads": heads, "head_dim": d, "dtype": str(DT)}
    RESULTS[tag] = res
    log(f"== {tag}")
    torch.manual_seed(0)
    scale = 1.0 / math.sqrt(d)
    # the Python-int BlockMask first (create_block_mask materialises the N x N mask)
    sync()
    t = time.perf_counter()
    try:
        bm_int = create_block_mask(sliding_int_mask(window), None, None, n, n, device=DEV)
        res["bm_int_build"] = "create_block_mask"
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        bm_int = torch.compile(create_block_mask)(sliding_int_mask(window), None, None, n, n, device=DEV)
        res["bm_int_build"] = "torch.compile(create_block_mask) after OOM"
    sync()
    res["bm_int_build_s"] = time.perf_counter() - t
    if CUDA:
        torch.cuda.empty_cache()
    t = time.perf_counter()
    bm_al = attnlab_block_mask(n, window)
    sync()
    res["bm_attnlab_build_s"] = time.perf_counter() - t
    bm_mix = BlockMask.from_kv_blocks(
        bm_al.kv_num_blocks, bm_al.kv_indices, bm_al.full_kv_num_blocks, bm_al.full_kv_indices,
        BLOCK_SIZE=bm_al.BLOCK_SIZE, mask_mod=sliding_int_mask(window), seq_lengths=(n, n),
    )  # fmt: skip
    res["block_masks"] = {"int": describe_bm(bm_int), "attnlab": describe_bm(bm_al)}
    res["int_vs_attnlab_equal"] = same_blocks(bm_int, bm_al)
    log(
        "  blockmask int:",
        res["block_masks"]["int"]["kv_num_blocks"],
        res["block_masks"]["int"]["full_kv_num_blocks"],
    )
    log(
        "  blockmask attnlab:",
        res["block_masks"]["attnlab"]["kv_num_blocks"],
        res["block_masks"]["attnlab"]["full_kv_num_blocks"],
    )
    log("  equal:", res["int_vs_attnlab_equal"])

    q = torch.randn(1, heads, n, d, device=DEV, dtype=DT)
    k = torch.randn_like(q)
    v = torch.randn_like(q)

    def sdpa() -> torch.Tensor:
        if CUDA:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    kw = {"scale": scale}
    variants: dict[str, Callable[[], Any]] = {
        "a_sdpa_cudnn_causal": sdpa,
        "b_static_intmask": lambda: STATIC(q, k, v, block_mask=bm_int, **kw),
        "b2_static_attnlab_layout_intmask": lambda: STATIC(q, k, v, block_mask=bm_mix, **kw),
        "d_static_attnlab_bm": lambda: STATIC(q, k, v, block_mask=bm_al, **kw),
        "c_dynamic_intmask": lambda: DYNAMIC(q, k, v, block_mask=bm_int, **kw),
        "c2_dynamic_attnlab_bm": lambda: DYNAMIC(q, k, v, block_mask=bm_al, **kw),
        "c3_dynamic_attnlab_bm_isdiv": lambda: DYNAMIC(
            q, k, v, block_mask=bm_al, kernel_options={"IS_DIVISIBLE": True}, **kw
        ),
        "c4_dynamic_intmask_isdiv": lambda: DYNAMIC(
            q, k, v, block_mask=bm_int, kernel_options={"IS_DIVISIBLE": True}, **kw
        ),
        "e0_attnlab_compiled_direct": lambda: aflex.compiled_flex()(
            q, k, v, block_mask=bm_al, score_mod=None, enable_gqa=False, **ATTNLAB_KW, **kw
        ),
        # what the flex backend would run with IS_DIVISIBLE passed when both lengths are multiples of 128
        "e1_attnlab_compiled_isdiv": lambda: aflex.compiled_flex()(
            q,
            k,
            v,
            block_mask=bm_al,
            score_mod=None,
            enable_gqa=False,
            kernel_options={"FORCE_USE_FLEX_ATTENTION": True, "IS_DIVISIBLE": True},
            **kw,
        ),
        "e_flex_run": lambda: aflex.flex_run(q, k, v, block_mask=bm_al, score_mod=None, scale=scale)[0],
        "f_attention_nocheck": lambda: attnlab.attention(
            q, k, v, method="sliding_window", causal=True, window=window, check_finite=False
        ),
        "g_attention_default": lambda: attnlab.attention(
            q, k, v, method="sliding_window", causal=True, window=window
        ),
    }
    first: dict[str, Any] = {}
    res["first_calls"] = first
    outs: dict[str, torch.Tensor] = {}
    ok: dict[str, Callable[[], Any]] = {}
    builds0 = dict(aflex.stats)
    for name, fn in variants.items():
        try:
            outs[name] = first_call(name, fn, first)
            ok[name] = fn
        except Exception as e:
            record_error(f"{tag}.{name}.first_call", e)
        save()
    res["attnlab_block_mask_cache_stats_delta"] = {k: aflex.stats[k] - builds0.get(k, 0) for k in aflex.stats}
    # every flex variant computes the same function
    ref = outs.get("e_flex_run")
    if ref is not None:
        res["max_abs_diff_vs_flex_run"] = {
            name: float((o.float() - ref.float()).abs().max())
            for name, o in outs.items()
            if name != "a_sdpa_cudnn_causal"
        }
    del outs, ref
    kernel_group = {n_: f for n_, f in ok.items() if n_ != "g_attention_default"}
    log(f"  interleaved kernel group ({len(kernel_group)} variants x {reps})")
    res["timing_kernel_group"] = interleaved(kernel_group, reps)
    save()
    called_group = {
        n_: ok[n_]
        for n_ in ("a_sdpa_cudnn_causal", "e_flex_run", "f_attention_nocheck", "g_attention_default")
        if n_ in ok
    }
    log(f"  interleaved as-called group ({len(called_group)} variants x {reps})")
    res["timing_called_group"] = interleaved(called_group, reps)
    res["wall_per_call_ms_10_back_to_back"] = {
        name: guarded(f"{tag}.{name}.wall", lambda fn=fn: wall_per_call_ms(fn, 10)) for name, fn in ok.items()
    }
    save()
    if CUDA:
        prof = {}
        for name in (
            "a_sdpa_cudnn_causal",
            "b_static_intmask",
            "c2_dynamic_attnlab_bm",
            "c3_dynamic_attnlab_bm_isdiv",
            "f_attention_nocheck",
            "g_attention_default",
        ):
            if name in ok:
                prof[name] = guarded(f"{tag}.{name}.profile", lambda fn=ok[name]: profile_kernels(fn))
        res["profiler_kernels"] = prof
    t = res["timing_kernel_group"]
    base = t.get("a_sdpa_cudnn_causal", {}).get("median_ms")
    for name, st in {**t, **{f"{k_}[called]": v_ for k_, v_ in res["timing_called_group"].items()}}.items():
        sp = f"{base / st['median_ms']:.2f}x" if base else ""
        log(f"  {name:42s} {st['median_ms']:9.3f} ms  (iqr {st['q1_ms']:.3f}-{st['q3_ms']:.3f})  {sp}")
    save()


# --------------------------------------------------------------------------------------------- host
def section_host(calls: int) -> None:
    log("== host time per call")
    b, h, n, d = (1, 1, 32, 16) if ARGS.quick else (1, 8, 256, 64)
    torch.manual_seed(1)
    q = torch.randn(b, h, n, d, device=DEV, dtype=DT)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    bm_int = create_block_mask(sliding_int_mask(1024), None, None, n, n, device=DEV)
    bm_al = attnlab_block_mask(n, 1024)
    spec = attnlab.get("sliding_window")
    params = spec.make_params({"window": 1024})
    call = resolve(q, k, v, method="sliding_window", causal=True, check_finite=False, window=1024)
    fns: dict[str, Callable[[], Any]] = {
        "sdpa_F_plain": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_attnlab_kernel_fn": lambda: sdpa_dense(q, k, v, causal=True, scale=scale),
        "b_flex_static_compile_intmask": lambda: STATIC(q, k, v, block_mask=bm_int, scale=scale),
        "c_flex_dynamic_compile_intmask": lambda: DYNAMIC(q, k, v, block_mask=bm_int, scale=scale),
        "e0_attnlab_compiled_direct": lambda: aflex.compiled_flex()(
            q, k, v, block_mask=bm_al, score_mod=None, scale=scale, enable_gqa=False, **ATTNLAB_KW
        ),
        "e_flex_run": lambda: aflex.flex_run(q, k, v, block_mask=bm_al, score_mod=None, scale=scale),
        "f_sliding_nocheck": lambda: attnlab.attention(
            q, k, v, method="sliding_window", causal=True, check_finite=False
        ),
        "g_sliding_default": lambda: attnlab.attention(q, k, v, method="sliding_window", causal=True),
        "softmax_nocheck": lambda: attnlab.attention(
            q, k, v, method="softmax", causal=True, check_finite=False
        ),
        "softmax_default": lambda: attnlab.attention(q, k, v, method="softmax", causal=True),
        "sigmoid_nocheck": lambda: attnlab.attention(
            q, k, v, method="sigmoid", causal=True, check_finite=False
        ),
        "sigmoid_default": lambda: attnlab.attention(q, k, v, method="sigmoid", causal=True),
        "sigmoid_launch_direct": lambda: sop.sigmoid_fwd_launch(q, k, v, scale, 0.0, True),
        "sigmoid_custom_op": lambda: sop.sigmoid_fwd(q, k, v, scale, 0.0, True),
        "sigmoid_attention_fn": lambda: sop.sigmoid_attention(q, k, v, scale, 0.0, True),
        # pieces of attnlab.attention (host only)
        "piece_resolve_sliding_nocheck": lambda: resolve(
            q, k, v, method="sliding_window", causal=True, check_finite=False
        ),
        "piece_validate_nocheck": lambda: validate(q, k, v, causal=True, scale=None, check_finite=False),
        "piece_validate_check": lambda: validate(q, k, v, causal=True, scale=None, check_finite=True),
        "piece_make_params": lambda: spec.make_params({"window": 1024}),
        "piece_choose": lambda: choose(call),
        "piece_cached_block_mask_hit": lambda: aflex.cached_block_mask(
            (spec.name, params.key(), True),
            lambda: None,
            n,
            n,
            DEV,  # type: ignore[arg-type,return-value]
        ),
        "piece_mask_context_new": lambda: MaskContext(n, n, True, DEV),
        "piece_torch_tensor_0d_on_device": lambda: torch.tensor(3, dtype=torch.int32, device=DEV),
        "piece_isfinite_all_bool_q": lambda: bool(torch.isfinite(q).all()),
    }
    res: dict[str, Any] = {"shape": [b, h, n, d], "calls": calls, "us_per_call": {}, "errors": {}}
    RESULTS["host"] = res
    for name, fn in fns.items():
        try:
            for _ in range(2 if ARGS.quick else 20):
                fn()
            sync()
            per = [wall_per_call_ms(fn, calls) * 1e3 for _ in range(3)]
            res["us_per_call"][name] = {"median": statistics.median(per), "all": per}
            log(f"  {name:36s} {statistics.median(per):8.1f} us/call")
        except Exception as e:
            record_error(f"host.{name}", e)
        save()
    prof: dict[str, str] = {}
    for name in ("f_sliding_nocheck", "g_sliding_default", "softmax_nocheck", "sigmoid_nocheck"):
        if name not in res["us_per_call"]:
            continue
        pr = cProfile.Profile()
        fn = fns[name]
        pr.enable()
        for _ in range(calls):
            fn()
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        text = "\n".join(line for line in s.getvalue().splitlines() if line.strip())[:5000]
        prof[name] = text
        LOG.write(f"--- cProfile {name} (200 calls, sorted by tottime)\n{text}\n")
    res["cprofile_200_calls"] = prof
    save()


# --------------------------------------------------------------------------------- sigmoid first call
def _jit_of(obj: Any) -> Any:
    while obj is not None and not hasattr(obj, "device_caches"):
        obj = getattr(obj, "fn", None)
    return obj


def jit_cache_size(obj: Any) -> int:
    jit = _jit_of(obj)
    if jit is None:
        return -1
    total = 0
    for entry in jit.device_caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        total += len(cache) if hasattr(cache, "__len__") else 0
    return total


_BENCH = {"calls": 0, "seconds": 0.0}


def _count_bench(tuner: Any) -> None:
    """Count the autotuner's config benchmarks (instance attribute shadows the method)."""
    orig = tuner._bench

    def counted(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            _BENCH["calls"] += 1
            _BENCH["seconds"] += time.perf_counter() - t

    tuner._bench = counted


def _qkv(n: int, heads: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, heads, n, d, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, heads, n, d, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, heads, n, d, device=DEV, dtype=DT, generator=g)
    return q, k, v


def section_sigmoid_first(lengths: list[int], heads: int, d: int) -> None:
    log("== sigmoid first call per length (attnlab.attention, causal, check_finite=False)")
    tuner = sop._FWD[0]
    _count_bench(tuner)
    rows = []
    RESULTS["sigmoid_first_call"] = {
        "heads": heads,
        "head_dim": d,
        "rows": rows,
        "long_bucket": sop.LONG_BUCKET,
    }
    for n in lengths:
        try:
            q, k, v = _qkv(n, heads, d)
            sync()
            a0, j0, b0, s0 = len(tuner.cache), jit_cache_size(tuner), _BENCH["calls"], _BENCH["seconds"]
            t = time.perf_counter()
            attnlab.attention(q, k, v, method="sigmoid", causal=True, check_finite=False)
            sync()
            first = time.perf_counter() - t
            a1, j1, b1, s1 = len(tuner.cache), jit_cache_size(tuner), _BENCH["calls"], _BENCH["seconds"]
            t = time.perf_counter()
            attnlab.attention(q, k, v, method="sigmoid", causal=True, check_finite=False)
            sync()
            second = time.perf_counter() - t
            if b1 > b0:
                what = f"autotuning ({b1 - b0} configs benchmarked, {s1 - s0:.2f} s in benchmarks; {j1 - j0} compiled)"
            elif j1 > j0:
                what = f"JIT compilation ({j1 - j0} new kernel specialization)"
            else:
                what = "neither (cache hit)"
            row = {
                "n": n, "first_s": first, "second_s": second, "overhead_s": first - second,
                "autotune_cache": [a0, a1], "jit_cache": [j0, j1], "bench_calls": b1 - b0, "bench_s": s1 - s0,
                "bucket": sop._bucket(n, n), "n_mod_16": n % 16, "n_mod_128": n % 128, "n_mod_64": n % 64,
                "verdict": what,
            }  # fmt: skip
            rows.append(row)
            log(f"  N={n:6d} first {first * 1e3:8.1f} ms  warm {second * 1e3:7.2f} ms  -> {what}")
            del q, k, v
        except Exception as e:
            record_error(f"sigmoid_first.{n}", e)
        save()
    RESULTS["sigmoid_first_call"]["autotuner_cache_keys"] = [str(k_) for k_ in tuner.cache]


# --------------------------------------------------------------------- sigmoid do_not_specialize
def _even_pinned(args: dict) -> dict:
    """EVEN_M/EVEN_N only select masked pointer loads; with TMA they are dead, so pin them there."""
    ev = sop._even(args)
    if args.get("TMA"):
        ev["EVEN_M"] = True
        ev["EVEN_N"] = True
    return ev


def _make_variants() -> dict[str, Any]:
    raw = sigmoid_fwd_kernel.fn
    dns = triton.jit(do_not_specialize=["N_Q", "N_K", "OFFSET"])(raw)
    dns2 = triton.jit(do_not_specialize=["N_Q", "N_K", "OFFSET"])(raw)
    pinned = {
        "EVEN_M": lambda a: _even_pinned(a)["EVEN_M"],
        "EVEN_N": lambda a: _even_pinned(a)["EVEN_N"],
        "EVEN_D": lambda a: _even_pinned(a)["EVEN_D"],
    }
    return {
        "original": sop._FWD_ANY,
        "dns": triton.heuristics(sop._EVEN)(dns),
        "dns_even_pinned": triton.heuristics(pinned)(dns2),
    }


def _config_for(causal: bool) -> triton.Config:
    cfgs = sop._configs("fwd")
    want = sop.MEASURED_FWD[causal]
    for c in cfgs:
        if sop._shape_of(c) == want:
            return c
    return cfgs[0]


def launch(
    kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, cfg: triton.Config
) -> torch.Tensor:
    """attnlab.kernels.sigmoid.op.sigmoid_fwd_launch's explicit-config path, with another kernel object."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    tma = sop._tma_ready(q, k, v, o)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    with descriptor_scratch(q.device):
        kernel[grid](
            q, k, v, o,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            h, h // h_kv, n_q, n_k, n_k - n_q, d, 1.0 / math.sqrt(d), 0.0,
            BLOCK_D=head_block(d), CAUSAL=causal, N_BUCKET=sop._bucket(n_q, n_k), TMA=tma,
            **sop._flags(q), **cfg.all_kwargs(),
        )  # fmt: skip
    return o


def section_sigmoid_dns(
    first_lengths: list[int], timed_lengths: list[int], heads: int, d: int, reps: int
) -> None:
    log("== sigmoid kernel with do_not_specialize on the lengths")
    res: dict[str, Any] = {"first_calls": {}, "timing": {}, "max_abs_diff_vs_original": {}}
    RESULTS["sigmoid_dns"] = res
    variants = _make_variants()
    cfg = _config_for(True)
    res["config_causal"] = str(cfg)
    for name in ("dns", "dns_even_pinned"):
        kern = variants[name]
        rows = []
        res["first_calls"][name] = rows
        for n in first_lengths:
            try:
                q, k, v = _qkv(n, heads, d)
                j0 = jit_cache_size(kern)
                sync()
                t = time.perf_counter()
                o = launch(kern, q, k, v, True, cfg)
                sync()
                dt = time.perf_counter() - t
                j1 = jit_cache_size(kern)
                ref = sop.sigmoid_fwd_launch(q, k, v, 1.0 / math.sqrt(d), 0.0, True, config=cfg)
                diff = float((o.float() - ref.float()).abs().max())
                rows.append(
                    {"n": n, "first_s": dt, "jit_cache": [j0, j1], "compiled": j1 > j0, "max_abs_diff": diff}
                )
                log(f"  {name:16s} N={n:6d} first {dt * 1e3:8.1f} ms  compiled={j1 > j0}  diff={diff:.3g}")
                del q, k, v, o, ref
            except Exception as e:
                record_error(f"sigmoid_dns.{name}.{n}", e)
            save()
    for n in timed_lengths:
        for causal in (True, False):
            _dns_timing(n, causal, variants, heads, d, reps, res)


def _dns_timing(n: int, causal: bool, variants: dict, heads: int, d: int, reps: int, res: dict) -> None:
    tag = f"N{n}_{'causal' if causal else 'noncausal'}"
    try:
        q, k, v = _qkv(n, heads, d, seed=3)
        cfg = _config_for(causal)
        scale = 1.0 / math.sqrt(d)
        fns = {
            "sdpa_cudnn": lambda: _cudnn(q, k, v, causal),
            "library_autotuned_path": lambda: sop.sigmoid_fwd_launch(q, k, v, scale, 0.0, causal),
            "original_explicit_config": lambda: launch(variants["original"], q, k, v, causal, cfg),
            "dns": lambda: launch(variants["dns"], q, k, v, causal, cfg),
            "dns_even_pinned": lambda: launch(variants["dns_even_pinned"], q, k, v, causal, cfg),
        }
        outs = {nm: f() for nm, f in fns.items()}
        sync()
        res["max_abs_diff_vs_original"][tag] = {
            nm: float((o.float() - outs["original_explicit_config"].float()).abs().max())
            for nm, o in outs.items()
            if nm != "sdpa_cudnn"
        }
        del outs
        res["timing"][tag] = interleaved(fns, reps)
        t = res["timing"][tag]
        base = t["original_explicit_config"]["median_ms"]
        for nm, st in t.items():
            log(f"  {tag:16s} {nm:26s} {st['median_ms']:8.3f} ms  vs original {st['median_ms'] / base:.3f}")
    except Exception as e:
        record_error(f"sigmoid_dns.timing.{tag}", e)
    save()


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    if CUDA:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ------------------------------------------------------------------------- host time, decomposed
def _juggle_then(fn: Callable[[], Any]) -> Any:
    """flex_run's scoped raise of dynamo's recompile limit around a call (attnlab/kernels/flex.py)."""
    config = torch._dynamo.config
    old = config.recompile_limit
    config.recompile_limit = max(old, aflex.RECOMPILE_LIMIT)
    try:
        return fn()
    finally:
        config.recompile_limit = old


def section_host2(calls: int, rounds: int) -> None:
    """Host time per call in rotating rounds (every function's block of ``calls`` calls in every round, so
    drift is shared), gc enabled, then the flex paths again with gc disabled."""
    import gc

    log("== host time per call, decomposed (rotating rounds)")
    b, h, n, d = (1, 1, 32, 16) if ARGS.quick else (1, 8, 256, 64)
    torch.manual_seed(1)
    q = torch.randn(b, h, n, d, device=DEV, dtype=DT)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    bm_int = create_block_mask(sliding_int_mask(1024), None, None, n, n, device=DEV)
    bm_al = attnlab_block_mask(n, 1024)
    compiled = aflex.compiled_flex()
    direct = lambda: compiled(
        q, k, v, block_mask=bm_al, score_mod=None, scale=scale, enable_gqa=False, **ATTNLAB_KW
    )

    def ctx_only() -> None:
        with sdpa_kernel(list(SDPA_ORDER), set_priority=True):
            pass

    fns: dict[str, Callable[[], Any]] = {
        "sdpa_F_plain": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_attnlab_kernel_fn": lambda: sdpa_dense(q, k, v, causal=True, scale=scale),
        "piece_sdpa_kernel_ctx_enter_exit": ctx_only,
        "softmax_nocheck": lambda: attnlab.attention(
            q, k, v, method="softmax", causal=True, check_finite=False
        ),
        "b_flex_static_compile_intmask": lambda: STATIC(q, k, v, block_mask=bm_int, scale=scale),
        "c_flex_dynamic_compile_intmask": lambda: DYNAMIC(q, k, v, block_mask=bm_int, scale=scale),
        "e0_attnlab_compiled_direct": direct,
        "e0_plus_recompile_limit_juggle": lambda: _juggle_then(direct),
        "e_flex_run": lambda: aflex.flex_run(q, k, v, block_mask=bm_al, score_mod=None, scale=scale),
        "f_sliding_nocheck": lambda: attnlab.attention(
            q, k, v, method="sliding_window", causal=True, check_finite=False
        ),
        "piece_recompile_limit_juggle_only": lambda: _juggle_then(lambda: None),
        "sigmoid_nocheck": lambda: attnlab.attention(
            q, k, v, method="sigmoid", causal=True, check_finite=False
        ),
        "sigmoid_launch_direct": lambda: sop.sigmoid_fwd_launch(q, k, v, scale, 0.0, True),
        "sigmoid_custom_op": lambda: sop.sigmoid_fwd(q, k, v, scale, 0.0, True),
    }
    res: dict[str, Any] = {"shape": [b, h, n, d], "calls": calls, "rounds": rounds}
    RESULTS["host2"] = res
    ok = {}
    for name, fn in fns.items():
        try:
            for _ in range(3 if ARGS.quick else 50):
                fn()
            sync()
            ok[name] = fn
        except Exception as e:
            record_error(f"host2.{name}", e)

    def rounds_of(group: dict[str, Callable[[], Any]], nrounds: int) -> dict[str, dict[str, Any]]:
        per: dict[str, list[float]] = {nm: [] for nm in group}
        names = list(group)
        for r in range(nrounds):
            for nm in names[r % len(names) :] + names[: r % len(names)]:
                per[nm].append(wall_per_call_ms(group[nm], calls) * 1e3)
        return {
            nm: {"median_us": statistics.median(ts), "min_us": min(ts), "all_us": [round(t, 1) for t in ts]}
            for nm, ts in per.items()
        }

    res["gc_on"] = rounds_of(ok, rounds)
    flex_names = [
        "sdpa_F_plain", "c_flex_dynamic_compile_intmask", "e0_attnlab_compiled_direct",
        "e0_plus_recompile_limit_juggle", "e_flex_run", "f_sliding_nocheck",
    ]  # fmt: skip
    gc.collect()
    gc.disable()
    try:
        res["gc_off"] = rounds_of({nm: ok[nm] for nm in flex_names if nm in ok}, rounds)
    finally:
        gc.enable()
    for key in ("gc_on", "gc_off"):
        for nm, st in res[key].items():
            log(f"  [{key}] {nm:34s} median {st['median_us']:7.1f} us  min {st['min_us']:7.1f} us")
    save()


# ----------------------------------------------------------------------------- decode alternatives
def section_decode_alt(nk: int, reps: int) -> None:
    """Decode-shaped softmax: attnlab's causal path (GQA K/V expanded + lower-right bias) against SDPA
    calls that keep GQA, and the other methods' decode times; correctness against attnlab's output."""
    if not CUDA:
        log("== decode_alt: skipped (no CUDA)")
        return
    from torch.nn.attention.bias import causal_lower_right

    log(f"== decode alternatives (N_k={nk}, GQA 32:8, D=128)")
    res: dict[str, Any] = {}
    RESULTS["decode_alt"] = res
    torch.manual_seed(7)
    k = torch.randn(1, 8, nk, 128, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    for nq in (1, 16):
        q = torch.randn(1, 32, nq, 128, device=DEV, dtype=DT)
        _decode_alt_one(q, k, v, nq, nk, reps, res, causal_lower_right)


def _decode_alt_one(
    q: Any, k: Any, v: Any, nq: int, nk: int, reps: int, res: dict, causal_lower_right: Any
) -> None:
    tag = f"nq{nq}"
    bias = causal_lower_right(nq, nk)
    boolmask = torch.ones(nq, nk, dtype=torch.bool, device=DEV).tril(diagonal=nk - nq)
    fns: dict[str, Callable[[], Any]] = {
        "attnlab_softmax_causal": lambda: attnlab.attention(
            q, k, v, method="softmax", causal=True, check_finite=False
        ),
        "attnlab_softmax_causal_flex": lambda: attnlab.attention(
            q, k, v, method="softmax", causal=True, check_finite=False, backend="flex"
        ),
        "sdpa_gqa_noncausal": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "sdpa_gqa_lower_right_bias": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=True
        ),
        "sdpa_gqa_bool_mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=boolmask, enable_gqa=True
        ),
        "attnlab_sliding_window_causal": lambda: attnlab.attention(
            q, k, v, method="sliding_window", causal=True, window=1024, check_finite=False
        ),
        "attnlab_sigmoid_causal": lambda: attnlab.attention(
            q, k, v, method="sigmoid", causal=True, check_finite=False
        ),
    }
    ok: dict[str, Callable[[], Any]] = {}
    outs = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn()
            sync()
            ok[name] = fn
        except Exception as e:
            record_error(f"decode_alt.{tag}.{name}", e)
    ref = outs.get("attnlab_softmax_causal")
    r: dict[str, Any] = {}
    res[tag] = r
    if ref is not None:
        r["max_abs_diff_vs_attnlab_softmax_causal"] = {
            nm: float((o.float() - ref.float()).abs().max())
            for nm, o in outs.items()
            if nm.startswith(("sdpa", "attnlab_softmax"))
        }
    del outs, ref
    r["timing"] = interleaved(ok, reps)
    r["wall_us_per_call"] = {nm: wall_per_call_ms(fn, 20) * 1e3 for nm, fn in ok.items()}
    for nm, st in r["timing"].items():
        log(
            f"  {tag} {nm:32s} {st['median_ms'] * 1e3:9.1f} us (events)  {r['wall_us_per_call'][nm]:9.1f} us (wall/call)"
        )
    # the Triton sigmoid path under CUDA-graph capture (custom op + descriptor scratch allocation)
    if "attnlab_sigmoid_causal" in ok:
        _capture_case(
            f"{tag}_sigmoid_causal_nocheck",
            ok["attnlab_sigmoid_causal"],
            q,
            True,
            RESULTS.setdefault("cuda_graph", {}),
        )
    save()


# ------------------------------------------------------------------------------------- CUDA graphs
def _device_ok() -> bool:
    try:
        torch.cuda.synchronize()
        return float(torch.ones(4, device=DEV).sum().item()) == 4.0
    except Exception:
        return False


def _capture_case(
    name: str, fn: Callable[[], torch.Tensor], q: torch.Tensor, warm: bool, store: dict
) -> None:
    """Warm on a side stream (unless ``warm`` is False), capture one call, replay with new q, compare."""
    r: dict[str, Any] = {"warm_before_capture": warm}
    store[name] = r
    try:
        if warm:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            sync()
            r["eager_ms"] = interleaved({"x": fn}, 20, warmup=1)["x"]["median_ms"]
            r["eager_wall_us_per_call"] = wall_per_call_ms(fn, 20) * 1e3
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        sync()
        r["captured"] = True
        q.copy_(torch.randn_like(q))
        g.replay()
        sync()
        ref = fn()
        sync()
        err = float((out.float() - ref.float()).abs().max())
        scale_ = float(ref.float().abs().max())
        r["replay_max_abs_diff_vs_eager"] = err
        r["ref_max_abs"] = scale_
        r["replay_correct"] = err <= 1e-2 * max(scale_, 1e-3)
        r["replay_ms"] = interleaved({"x": g.replay}, 20, warmup=1)["x"]["median_ms"]
        log(
            f"  {name:44s} captured; replay diff {err:.3g} (ref max {scale_:.3g}); eager {r.get('eager_ms', float('nan')):.3f} ms, replay {r['replay_ms']:.3f} ms"
        )
        del g, out, ref
    except Exception as e:
        r["captured"] = False
        r["error"] = f"{type(e).__name__}: {e}"[:1500]
        chain, c = [], e.__context__ or e.__cause__
        while c is not None and len(chain) < 4:
            chain.append(f"{type(c).__name__}: {c}"[:800])
            c = c.__context__ or c.__cause__
        r["error_chain"] = chain
        r["traceback_tail"] = traceback.format_exc()[-2500:]
        log(f"  {name:44s} FAILED: {r['error'][:300]}")
        r["device_ok_after"] = _device_ok()
        log(f"    device usable after the failure: {r['device_ok_after']}")
    save()


def section_graph(nk: int, fail_modes: bool) -> None:
    if not CUDA:
        log("== graph: skipped (no CUDA)")
        return
    key = "cuda_graph_failure_modes" if fail_modes else "cuda_graph"
    log(f"== {key} (N_k={nk}, GQA 32:8, D=128)")
    store: dict[str, Any] = RESULTS.setdefault(key, {})
    torch.manual_seed(5)
    k = torch.randn(1, 8, nk, 128, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    for nq in (1, 16):
        q = torch.randn(1, 32, nq, 128, device=DEV, dtype=DT)
        if not _graph_cases(q, k, v, nq, fail_modes, store):
            return


def _graph_cases(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nq: int, fail_modes: bool, store: dict
) -> bool:
    """The capture cases of one decode shape; False when the device became unusable."""
    if not fail_modes:
        cases = [
            (f"nq{nq}_sdpa_F_direct_gqa_noncausal", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), True),
            (f"nq{nq}_softmax_causal_nocheck", lambda: attnlab.attention(
                q, k, v, method="softmax", causal=True, check_finite=False), True),
            (f"nq{nq}_softmax_noncausal_nocheck", lambda: attnlab.attention(
                q, k, v, method="softmax", causal=False, check_finite=False), True),
            (f"nq{nq}_sliding_window_causal_nocheck", lambda: attnlab.attention(
                q, k, v, method="sliding_window", causal=True, window=1024, check_finite=False), True),
        ]  # fmt: skip
    else:
        # a BlockMask cache miss during capture (the BlockMask and MaskContext's 0-d tensors built inside
        # the capture), then the default check_finite=True
        cases = [
            (f"nq{nq}_sliding_window_cold_blockmask_cache", lambda: attnlab.attention(
                q, k, v, method="sliding_window", causal=True, window=777, check_finite=False), False),
            (f"nq{nq}_softmax_causal_check_finite_default", lambda: attnlab.attention(
                q, k, v, method="softmax", causal=True), True),
            (f"nq{nq}_sliding_window_check_finite_default", lambda: attnlab.attention(
                q, k, v, method="sliding_window", causal=True, window=1024), True),
        ]  # fmt: skip
    for name, fn, warm in cases:
        if elapsed() > ARGS.budget_s + (30 if fail_modes else 0):
            RESULTS["notes"].append(f"graph case {name} skipped: budget")
            continue
        if not warm:  # compile this shape first (another window: the same compiled kernel), then miss
            attnlab.attention(q, k, v, method="sliding_window", causal=True, window=778, check_finite=False)
            sync()
        _capture_case(name, fn, q, warm, store)
        if not _device_ok():
            RESULTS["notes"].append(f"device unusable after {name}; graph section stopped")
            return False
    return True


def summary() -> None:
    log("================ SUMMARY ================")
    for tag in [k for k in RESULTS if k.startswith("flex_N")]:
        t = RESULTS[tag].get("timing_kernel_group", {})
        tc = RESULTS[tag].get("timing_called_group", {})
        base = t.get("a_sdpa_cudnn_causal", {}).get("median_ms")
        raw = t.get("b_static_intmask", {}).get("median_ms")
        log(f"{tag}: median ms (speedup vs cuDNN; ratio vs raw static flex)")
        for name, st in list(t.items()) + [(f"{k}[called]", v) for k, v in tc.items()]:
            m = st["median_ms"]
            log(
                f"  {name:42s} {m:8.3f}  {base / m if base else float('nan'):5.2f}x  {m / raw if raw else float('nan'):5.3f}"
            )
        fc = RESULTS[tag].get("first_calls", {})
        log(
            "  first calls (s): "
            + ", ".join(f"{k.split('_')[0]}={v['first_call_s']:.1f}" for k, v in fc.items())
        )
    h = RESULTS.get("host", {}).get("us_per_call", {})
    if h:
        log("host us/call (1x8x256x64): " + ", ".join(f"{k}={v['median']:.0f}" for k, v in h.items()))
    sf = RESULTS.get("sigmoid_first_call", {}).get("rows", [])
    for r in sf:
        log(
            f"sigmoid first N={r['n']:6d}: {r['first_s'] * 1e3:8.1f} ms (warm {r['second_s'] * 1e3:6.2f}) {r['verdict']}"
        )
    sd = RESULTS.get("sigmoid_dns", {})
    for name, rows in sd.get("first_calls", {}).items():
        log(f"{name} recompiles: " + ", ".join(f"{r['n']}:{'C' if r['compiled'] else '-'}" for r in rows))
    for tag, t in sd.get("timing", {}).items():
        base = t["original_explicit_config"]["median_ms"]
        log(
            f"sigmoid {tag}: "
            + ", ".join(f"{k}={v['median_ms']:.3f}ms({v['median_ms'] / base:.3f})" for k, v in t.items())
        )
    for key in ("cuda_graph", "cuda_graph_failure_modes"):
        for name, r in RESULTS.get(key, {}).items():
            if r.get("captured"):
                log(
                    f"graph {name}: OK correct={r.get('replay_correct')} eager {r.get('eager_ms', float('nan')):.3f} ms replay {r.get('replay_ms', float('nan')):.3f} ms"
                )
            else:
                log(f"graph {name}: FAIL {r.get('error', '')[:160]}")
    log(f"errors: {list(RESULTS['errors'])}")


def main() -> None:
    def _env() -> dict[str, Any]:
        from attnlab.bench.env import environment

        return environment(DEV)

    env = guarded("environment", _env) or {}
    env.setdefault("commit", os.environ.get("ATTNLAB_COMMIT", "unknown"))
    env.setdefault("torch", torch.__version__)
    env.setdefault("triton", triton.__version__)
    env["dirty_paths_at_staging"] = os.environ.get("ATTNLAB_DIRTY", "")
    env["argv"] = sys.argv
    RESULTS["env"] = env
    log("env:", json.dumps(env, default=str))
    save()
    quick = ARGS.quick
    heads, d = (2, 64) if quick else (32, 128)
    sections = ARGS.sections.split(",")
    plan: list[tuple[str, Callable[[], Any]]] = []
    if "flex32" in sections:
        plan.append(
            (
                "flex32",
                lambda: section_flex(
                    512 if quick else 32768, 64 if quick else 1024, heads, d, 5 if quick else ARGS.reps
                ),
            )
        )
    if "host" in sections:
        plan.append(("host", lambda: section_host(3 if quick else 200)))
    if "sigmoid_first" in sections:
        lens = (
            [32, 48, 40, 32]
            if quick
            else [
                8192,
                8320,
                9216,
                12288,
                16384,
                16400,
                32768,
                8200,
                8195,
                4096,
                6144,
                4100,
                2048,
                8192,
                16400,
            ]
        )
        plan.append(
            ("sigmoid_first", lambda: section_sigmoid_first(lens, 1 if quick else heads, 16 if quick else d))
        )
    if "sigmoid_dns" in sections:
        fl = [32, 48, 40] if quick else [8192, 8320, 16400, 8200, 12345, 32768]
        tl_ = [32] if quick else [16384, 32768]
        plan.append(
            (
                "sigmoid_dns",
                lambda: section_sigmoid_dns(
                    fl, tl_, 1 if quick else heads, 16 if quick else d, 3 if quick else ARGS.reps
                ),
            )
        )
    if "graph" in sections:
        plan.append(("graph", lambda: section_graph(2048 if quick else 131072, False)))
    if "flex64" in sections:
        plan.append(
            (
                "flex64",
                lambda: section_flex(
                    1024 if quick else 65536, 128 if quick else 2048, heads, d, 5 if quick else ARGS.reps
                ),
            )
        )
    if "host2" in sections:
        plan.append(("host2", lambda: section_host2(3 if quick else 200, 2 if quick else 9)))
    if "decode_alt" in sections:
        plan.append(("decode_alt", lambda: section_decode_alt(2048 if quick else 131072, 5 if quick else 30)))
    if "graph_fail" in sections:
        plan.append(("graph_fail", lambda: section_graph(2048 if quick else 131072, True)))
    for name, fn in plan:
        if elapsed() > ARGS.budget_s:
            RESULTS["notes"].append(
                f"section {name} skipped: budget {ARGS.budget_s} s reached at {elapsed():.0f} s"
            )
            log(f"skip {name}: budget reached")
            continue
        t = time.perf_counter()
        guarded(f"section.{name}", fn)
        RESULTS.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        if CUDA:
            torch.cuda.empty_cache()
        save()
    summary()
    save()


if __name__ == "__main__":
    main()
