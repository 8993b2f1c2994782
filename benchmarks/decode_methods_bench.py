"""Every decode method's attention step at a long cache, as called, eager and in a CUDA graph (GPU).

One layer's decode step: q (B, 32, 1, 128) against a cache k/v (B, 8, N, 128) (GQA 32:8), bf16, budget
4096 tokens, N = 128K by default. Each step is the prepared op as a user calls it (``attnlab.prepare(method,
causal=True, **params)`` with the library's backend choice, the state of an earlier call passed in):

- ``page_topk``: its step with one appended token (as ``decode_bench.py`` times it, 10 reps here);
- ``retrieval_heads_kv_none`` / ``_1of8``: no retrieval head / KV head 0 keeps the whole cache;
- ``snapkv_step`` / ``h2o_step``: a step after the decision (made by a first call with 16 queries);
- ``h2o_per_step``: H2O's decoding loop (``per_step=True``, ``recent=budget // 2``, unnormalised): a step
  over the budget + 1 candidates, then the eviction of one;
- ``recycled_partial`` / ``recycled_full``: a step between full steps / a full step (``stride=10``);
- ``tokenselect_vote`` / ``tokenselect_reuse``: a step that votes again (``threshold=1``) / one that
  reuses the previous selection (the same query: cosine 1; the reuse test reads one boolean on the host);
- ``tidal_reuse`` / ``tidal_select`` / ``tidal_full``: a layer by its role.

Each step is timed eager (``<name>``) and captured in a CUDA graph (``<name>_graph``; a replay runs the step
again from the same state, as page_topk's step is timed in ``decode_bench.py``); a step whose capture
fails is recorded with the error in ``failed_sides``. Beside them, in the same interleaved rounds with the
L2 cache flushed before every call: dense cuDNN SDPA decode, eager and graphed. Speedups are against the
faster dense side.

Schedules (per-step cost of a method whose steps differ; from the graphed medians where the capture
worked, else eager, named in the output): ``recycled`` with stride 10 = (full + 9 partial) / 10;
``tidal`` on TidalDecode's Llama-3-8B schedule (32 layers: 2 full, 2 select, 28 reuse) per layer;
``tokenselect``: the share of reuse steps it needs to average 4x (B=1) / 8x (B=8) over dense.

Checks first (B=2, the same N; ``--check-batch``): each step's output from the default backend against the
method's reference from the same state, run on fp32 copies of q, k, v (an fp32 output) (bound: twice the torch backend's error against the same
reference, plus a floor), and the positions its new state keeps against the torch backend's and the
reference's (share in common: bf16 products may order near-ties differently from fp32).

Usage: python benchmarks/decode_methods_bench.py --out results.json [--context 131072] [--batches 1 8]
       [--reps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import FAILED, graph_of, kernel_profile, row, timed

import attnlab
from attnlab.bench.env import environment
from attnlab.core import Result
from attnlab.registry import get

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
#: TidalDecode's Llama-3-8B schedule: layers per role in one decode step
TIDAL_SCHEDULE = {"full": 2, "select": 2, "reuse": 28}
RECYCLED_STRIDE = 10

#: name -> (method, parameters, how the state is made, query: "one" / "obs")
Step = tuple[str, dict[str, Any], Any, torch.Tensor]


def _state(x: object) -> Any:
    assert isinstance(x, Result)
    return x.state


def build_steps(
    q: torch.Tensor, q_obs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int
) -> dict[str, Step]:
    """Each timed step: (method, params, input state, query)."""
    n = k.shape[2]

    def first(method: str, qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, **p: Any) -> Any:
        return _state(attnlab.attention(qq, kk, vv, method=method, causal=True, **p))

    def want(*names: str) -> bool:  # (--steps: build only the steps asked for)
        return STEPS is None or any(name in STEPS for name in names)

    steps: dict[str, Step] = {}
    if want("page_topk"):
        pt = {
            "budget": budget,
            "page": 16,
        }  # page_topk's state before this step's token (decode_bench's step)
        steps["page_topk"] = (
            "page_topk",
            pt,
            first("page_topk", q, k[:, :, : n - 1], v[:, :, : n - 1], **pt),
            q,
        )
    steps["retrieval_heads_kv_none"] = ("retrieval_heads_kv", {"budget": budget}, None, q)
    steps["retrieval_heads_kv_1of8"] = ("retrieval_heads_kv", {"budget": budget, "heads": (0,)}, None, q)
    for method in ("snapkv", "h2o"):  # decided at a first call with 16 observation queries, then a step
        if want(f"{method}_step"):
            p = {"budget": budget}
            steps[f"{method}_step"] = (method, p, first(method, q_obs, k, v, **p), q)
    if want("h2o_per_step"):
        # per-step H2O: the state of the cache minus its last token, so the step attends to budget + 1 tokens
        ps = {"budget": budget, "per_step": True, "recent": budget // 2, "normalize": False}
        steps["h2o_per_step"] = ("h2o", ps, first("h2o", q_obs, k[:, :, : n - 1], v[:, :, : n - 1], **ps), q)
    rp = {"budget": budget, "stride": RECYCLED_STRIDE}
    if want("recycled_partial"):
        steps["recycled_partial"] = ("recycled", rp, first("recycled", q, k, v, **rp), q)
    steps["recycled_full"] = ("recycled", rp, None, q)
    if want("tokenselect_vote", "tokenselect_reuse"):
        tsp: dict[str, Any] = {
            "budget": budget,
            "n_init": min(128, budget // 32),
            "n_local": min(512, budget // 8),
        }
        ts = first("tokenselect", q, k, v, **tsp)
        steps["tokenselect_vote"] = ("tokenselect", {**tsp, "threshold": 1.0}, ts, q)
        steps["tokenselect_reuse"] = ("tokenselect", tsp, ts, q)  # the same query: cosine 1 > 0.9
    if want("tidal_reuse"):
        chosen = first("tidal", q, k, v, budget=budget, role="select")
        steps["tidal_reuse"] = ("tidal", {"budget": budget, "role": "reuse"}, chosen, q)
    steps["tidal_select"] = ("tidal", {"budget": budget, "role": "select"}, None, q)
    steps["tidal_full"] = ("tidal", {"budget": budget, "role": "full"}, None, q)
    return {name: step for name, step in steps.items() if want(name)}


def _positions(state: Any) -> torch.Tensor | None:
    for name in ("positions", "kept"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _overlap(a: torch.Tensor | None, b: torch.Tensor | None, n_k: int) -> float | None:
    """Share of b's kept positions that a keeps too (worst row); None when either keeps none."""
    if a is None or b is None or a.shape[:2] != b.shape[:2] or b.shape[2] == 0:
        return None
    ma = torch.zeros(*a.shape[:2], n_k + 1, dtype=torch.bool, device=a.device)
    ma.scatter_(2, torch.where(a >= 0, a, n_k).long(), True)
    hit = ma.gather(2, torch.where(b >= 0, b, n_k).long()) & (b >= 0)
    real = (b >= 0).sum(2).clamp(min=1)
    return round(float((hit.sum(2) / real).min()), 6)


def check_steps(b: int, n: int, budget: int, dev: torch.device) -> dict[str, Any]:
    """Each step's default-backend output against its fp32 reference from the same state (module docstring)."""
    torch.manual_seed(7)
    q = torch.randn(b, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    q_obs = torch.randn(b, HEADS, 16, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    eps = torch.finfo(torch.bfloat16).eps
    out: dict[str, Any] = {}
    for name, (method, p, st, qq) in build_steps(q, q_obs, k, v, budget).items():
        try:
            op = attnlab.prepare(method, causal=True, **p)
            got = op(qq, k, v, state=st)
            low = attnlab.prepare(method, causal=True, backend="torch", **p)(qq, k, v, state=st)
            spec = get(method)
            ref_out, ref_state = spec.reference(  # fp32 operands: an fp32 output to measure against
                qq.float(),
                k.float(),
                v.float(),
                spec.make_params(p),
                causal=True,
                scale=scale,
                upcast=True,
                state=st,
            )
            assert isinstance(got, Result) and isinstance(low, Result)
            err = float((got.out.float() - ref_out.float()).abs().max())
            err_low = float((low.out.float() - ref_out.float()).abs().max())
            peak = float(ref_out.float().abs().max())
            bound = 2 * err_low + 1e-5 * (1 + peak) + 0.5 * eps * peak
            out[name] = {
                "backend": getattr(
                    attnlab.explain(qq, k, v, method=method, causal=True, **p).backend, "name", None
                ),
                "max_abs_err": err,
                "torch_backend_err": err_low,
                "bound": bound,
                "ok": err <= bound,
                "state_overlap_vs_torch_backend": _overlap(_positions(got.state), _positions(low.state), n),
                "state_overlap_vs_reference": _overlap(_positions(got.state), _positions(ref_state), n),
            }
        except Exception as e:  # recorded, never counted as passed
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        del name
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bench_batch(b: int, n: int, budget: int, reps: int, flush: torch.Tensor, profile: bool) -> dict[str, Any]:
    torch.manual_seed(100 + b)
    dev = flush.device
    q = torch.randn(b, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    q_obs = torch.randn(b, HEADS, 16, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    kinds = [SDPBackend.CUDNN_ATTENTION] if dev.type == "cuda" else [SDPBackend.MATH]

    def dense() -> object:
        with sdpa_kernel(kinds):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    fns: dict[str, Callable[[], object]] = {"dense_cudnn": dense}
    graphs: dict[str, Callable[[], object]] = {}
    for name, fn in [("dense_cudnn", dense)] + [
        (name, _stepper(method, p, st, qq, k, v))
        for name, (method, p, st, qq) in build_steps(q, q_obs, k, v, budget).items()
    ]:
        fns[name] = fn
        try:
            graphs[f"{name}_graph"] = graph_of(fn)
        except Exception as e:  # recorded; the side is left out
            FAILED[f"B{b}:{name}_graph"] = f"{type(e).__name__}: {str(e)[:300]}"
    from attnlab.catalog.decode import retrieval_heads_kv as rh
    from attnlab.kernels.decode import evict as dev_evict
    from attnlab.kernels.decode import op as dop

    def target(flag: str) -> tuple[Any, str]:  # "NAME" in op, "evict.NAME" in evict, "rh.NAME" in rh
        modules = {"evict": dev_evict, "rh": rh}
        prefix, _, rest = flag.partition(".")
        return (modules[prefix], rest) if rest else (dop, flag)

    for name, flags in GRAPH_VARIANTS.items():  # a step captured under other kernel settings
        if name.split(":")[0] not in fns:
            continue
        saved = {f: getattr(*target(f)) for f in flags}
        try:
            for f, val in flags.items():
                setattr(*target(f), val)
            graphs[name] = graph_of(fns[name.split(":")[0]])
        except Exception as e:  # recorded; the side is left out
            FAILED[f"B{b}:{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            for f, val in saved.items():
                setattr(*target(f), val)
    host = host_profiles(fns, HOST_PROFILED if b == 1 else ()) if profile and dev.type == "cuda" else {}
    times = timed({**fns, **graphs}, reps, flush)
    dense_best = min(t.median_ms for name, t in times.items() if name.startswith("dense_"))
    medians = {name: t.median_ms for name, t in times.items()}
    profiles = {}
    if profile and dev.type == "cuda":
        for name, fn in graphs.items():
            if not name.startswith("dense"):
                prof = kernel_profile(fn, flush, reps=10)
                prof["kernels"] = sorted(prof["kernels"], key=lambda r: -r["median_us"])[:6]
                profiles[name] = prof
    return {
        "batch": b,
        "context": n,
        "budget": budget,
        "dense_best_us": round(dense_best * 1e3, 2),
        "times": {name: row(t, None) for name, t in times.items()},
        "speedup_vs_best_dense_median": {
            name: round(dense_best / t.median_ms, 2)
            for name, t in times.items()
            if not name.startswith("dense")
        },
        "schedules": schedules(medians, dense_best, b),
        "graph_kernel_profiles": profiles,
        "host_profiles": host,
        "target_speedup": 8 if b >= 8 else 4,
    }


#: graphed steps under other settings of the decode kernel (``attnlab.kernels.decode.op``; "evict.NAME" in
#: ``kernels.decode.evict``, "rh.NAME" in ``catalog.decode.retrieval_heads_kv``): "<step>:<label>"
GRAPH_VARIANTS: dict[str, dict[str, Any]] = {
    "page_topk:split2048": {"MAX_SPLIT_TOKENS": 2048},  # the cap up to c5a93cb
    "h2o_per_step:evict1024x4": {"evict.EVICT_BLOCK": 1024, "evict.EVICT_WARPS": 4},  # up to d02bba7
    "retrieval_heads_kv_none:lists": {"rh.USE_RANGES": False},  # token lists, up to this change
    "retrieval_heads_kv_1of8:two_launches": {"rh.USE_RANGES": False},  # two launches, up to this change
    "retrieval_heads_kv_1of8:split448": {"MIN_SPLIT_TOKENS": 448},
    "retrieval_heads_kv_1of8:split640": {"MIN_SPLIT_TOKENS": 640},
    "retrieval_heads_kv_1of8:split768": {"MIN_SPLIT_TOKENS": 768},
    "retrieval_heads_kv_1of8:split640_block32_stages3": {
        "MIN_SPLIT_TOKENS": 640,
        "BLOCK_N": 32,
        "DECODE_LOOP_STAGES": 3,
    },
}
#: the steps to build and time (``--steps``; None: every step)
STEPS: set[str] | None = None
#: eager steps whose host time is profiled (cProfile, B=1)
HOST_PROFILED = ("snapkv_step", "retrieval_heads_kv_none", "tidal_reuse", "tokenselect_reuse")


def host_profiles(
    fns: dict[str, Callable[[], object]], names: tuple[str, ...], calls: int = 20
) -> dict[str, Any]:
    """Per eager step, ``calls`` calls back to back (no L2 flush between them, as a decode loop calls it):
    the host time per call, the GPU time per call (CUDA events around the loop: the rate of an eager loop,
    bound by the host or the GPU, whichever is slower), and for ``names`` the functions with the most own
    time under cProfile."""
    import cProfile
    import pstats
    import time

    out: dict[str, Any] = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        out[name] = {
            "host_us_per_call": round(host_us, 1),
            "loop_us_per_call": round(start.elapsed_time(end) / calls * 1e3, 1),
        }
        if name not in names:
            continue
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
        out[name]["top_own_time_us_per_call"] = [
            [f"{Path(f).name}:{line}:{fname}", round(v[2] / calls * 1e6, 1), v[1] // calls]
            for (f, line, fname), v in top
        ]
    return out


def _stepper(
    method: str, p: dict[str, Any], st: Any, qq: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Callable[[], object]:
    op = attnlab.prepare(method, causal=True, **p)
    return lambda: op(qq, k, v, state=st)


def _best(medians: dict[str, float], name: str) -> tuple[float, str] | None:
    """(median ms, side) of a step: its graph when captured, else eager."""
    for side in (f"{name}_graph", name):
        if side in medians:
            return medians[side], side
    return None


def schedules(medians: dict[str, float], dense_best: float, b: int) -> dict[str, Any]:
    """Per-step (per-layer) costs of the methods whose steps differ (module docstring)."""
    out: dict[str, Any] = {}
    full, part = _best(medians, "recycled_full"), _best(medians, "recycled_partial")
    if full and part:
        t = (full[0] + (RECYCLED_STRIDE - 1) * part[0]) / RECYCLED_STRIDE
        out["recycled_stride10"] = {"per_step_us": round(t * 1e3, 2), "speedup": round(dense_best / t, 2),
                                    "from": [full[1], part[1]]}  # fmt: skip
    roles = {r: _best(medians, f"tidal_{r}") for r in TIDAL_SCHEDULE}
    if all(roles.values()):
        layers = sum(TIDAL_SCHEDULE.values())
        t = sum(TIDAL_SCHEDULE[r] * roles[r][0] for r in TIDAL_SCHEDULE) / layers  # type: ignore[index]
        out["tidal_llama3_8b"] = {"per_layer_us": round(t * 1e3, 2), "speedup": round(dense_best / t, 2),
                                  "schedule": TIDAL_SCHEDULE, "from": [r[1] for r in roles.values()]}  # type: ignore[index]  # fmt: skip
    vote, reuse = _best(medians, "tokenselect_vote"), _best(medians, "tokenselect_reuse")
    if vote and reuse:
        target = dense_best / (8 if b >= 8 else 4)  # per-step time that meets the target
        need = None if reuse[0] >= target else max(0.0, (vote[0] - target) / (vote[0] - reuse[0]))
        out["tokenselect"] = {"reuse_share_for_target": None if need is None else round(need, 3),
                              "from": [vote[1], reuse[1]]}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--context", type=int, default=131072, help="cache length N (tokens)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=4096, help="tokens attended per (batch, KV head)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per side (>= 10 on a GPU)")
    ap.add_argument("--check-batch", type=int, default=2, help="batch of the correctness checks (0: none)")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel profile of each graphed step")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (a dry run)")
    ap.add_argument("--steps", nargs="+", default=None, help="time only these steps (default: every step)")
    args = ap.parse_args()
    global STEPS
    STEPS = None if args.steps is None else set(args.steps)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.context, args.batches, args.budget, args.reps, args.check_batch = 256, [1, 2], 64, 2, 2
        flush = torch.empty(16)
    elif not torch.cuda.is_available():
        raise SystemExit("decode_methods_bench needs a CUDA GPU (or --smoke)")
    else:
        flush = torch.empty(256 * 2**20 // 4, device="cuda", dtype=torch.float32)
        args.reps = max(10, args.reps)
    out: dict[str, Any] = {
        "what": "one decode step (one layer) of every decode method vs dense SDPA decode; GQA 32:8, D=128, "
        "bf16, L2 flushed; eager and CUDA-graph sides",
        "env": environment(flush.device),
        "checks": {},
        "batches": [],
        "failed_sides": FAILED,
    }

    def write() -> None:  # after every part, so a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    if args.check_batch:
        out["checks"] = check_steps(args.check_batch, args.context, args.budget, flush.device)
        print(json.dumps(out["checks"]), flush=True)
        write()
    for b in args.batches:
        out["batches"].append(
            bench_batch(b, args.context, args.budget, args.reps, flush, not args.no_profile)
        )
        print(
            json.dumps({k: v for k, v in out["batches"][-1].items() if k != "graph_kernel_profiles"}),
            flush=True,
        )
        write()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
