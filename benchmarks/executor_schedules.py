"""The block-sparse executor's schedules at issue 8's points (a kernel-level probe, labelled; not a headline).

    PYTHONPATH=$PWD python benchmarks/executor_schedules.py --out DIR [--points random_nc,random_c,window]

For each point (B=1, H=32, H_kv=8, D=128, bf16, 128 x 128 plan tiles):

- ``random_nc`` / ``random_c``: random per-head plans at 32K, block density ~0.1 (non-causal / causal);
- ``window``: sliding_window 1024 at 32K, causal (the method's own static plan).

Forward: cuDNN dense, FlexAttention with the plan's BlockMask, the executor autotuned, and the executor with
each schedule (BLOCK_M, BLOCK_N, warps, stages) launched directly; every executor side's output is first
compared with Flex's (max abs difference; bf16 outputs differ by rounding). Forward + backward on every
side (cuDNN and Flex through autograd; the executor as its forward then its backward launcher, so that a
backward schedule can be named): cuDNN, Flex, the executor autotuned, and the executor with
each dq schedule (dkdv fixed at its first) and each dkdv schedule (dq fixed at its first); each executor
side's gradients compared with Flex's (max abs difference over max abs value). One timing group per pass
(attnlab.bench.timing.measure_interleaved: CUDA events, balanced rounds, >= 10 calls, spread kept). A
torch.profiler pass splits the autotuned executor's forward and backward by kernel.

Writes DIR/executor_schedules.json (with the commit and a dirty-tree flag from ATTNLAB_COMMIT or git).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_sparse_bench import random_plan

import attnlab
from attnlab.bench.timing import measure_interleaved
from attnlab.kernels.block_sparse import op
from attnlab.kernels.flex import flex_options, flex_run
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans.executor import executor_tables

DEV = torch.device("cuda")
FWD = [*op.FWD_SHAPES[:6], (128, 64, 4, 4), (128, 128, 8, 2, 2), (128, 64, 8, 3, 2)]
DQ = [*op.DQ_SHAPES[:4], (128, 64, 8, 2, 2), (128, 64, 4, 3, 2)]
DKDV = [*op.DKDV_SHAPES[:4], (64, 128, 8, 2, 2), (64, 64, 4, 3, 2)]


def _config(shape: tuple[int, ...]) -> triton.Config:
    m, n, w, s, *split = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n} | ({"SPLIT": split[0]} if split else {}), num_warps=w,
                         num_stages=s)  # fmt: skip


def _commit() -> str:
    if os.environ.get("ATTNLAB_COMMIT"):
        return os.environ["ATTNLAB_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _timings(fns: dict[str, Any]) -> dict[str, Any]:
    res = measure_interleaved(fns, DEV, warmup=3, target_s=0.3, min_reps=10, max_reps=30)
    return {n: {"median_ms": t.median_ms, "min_ms": t.min_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms,
                "reps": t.reps} for n, t in res.items()}  # fmt: skip


def _point(name: str) -> tuple[Any, ...]:
    n = 32768
    torch.manual_seed(0)
    q = torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    if name == "window":
        causal = True
        res = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=1024,
                                backend="block_sparse", return_plan=True)  # fmt: skip
        plan = res.plan
    else:
        causal = name == "random_c"
        plan = random_plan(32, n, causal, 0.2 if causal else 0.1, seed=n)
    return q, k, v, plan, causal


def _profile(fn) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Device time per kernel name over 5 calls (ms per call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t:
            out[e.key[:80]] = round(t / 1000 / 5, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def run_point(name: str, fwd_only: bool = False) -> dict[str, Any]:
    q, k, v, plan, causal = _point(name)
    n = q.shape[2]
    scale = 128**-0.5
    row: dict[str, Any] = {"point": name, "n": n, "causal": causal, "block_density": plan.block_density}
    if name == "window":
        row["density"] = plan.density
    tables = tuple(t for t in executor_tables(plan).as_args())
    bm = plan.block_mask()
    opts = flex_options(n, n, True, DEV)
    attnlab.settings.autotune = True
    flex_o = flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0]
    fwd: dict[str, Any] = {
        "cudnn": lambda: sdpa_dense(q, k, v, causal=causal, scale=scale),
        "flex": lambda: flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0],
        "exec_auto": lambda: op.block_sparse_fwd_launch(q, k, v, tables, scale, causal)[0],
    }
    diffs: dict[str, float] = {}
    for shape in FWD:
        label = "exec_" + "x".join(map(str, shape))
        cfg = _config(shape)
        try:
            o = op.block_sparse_fwd_launch(q, k, v, tables, scale, causal, config=cfg)[0]
            diffs[label] = (o.float() - flex_o.float()).abs().max().item()
            fwd[label] = lambda cfg=cfg: op.block_sparse_fwd_launch(
                q, k, v, tables, scale, causal, config=cfg
            )
        except Exception as e:  # a schedule that does not launch (shared memory): recorded
            diffs[label] = float("nan")
            row.setdefault("refused", {})[label] = repr(e)[:200]
    diffs["exec_auto"] = (op.block_sparse_fwd_launch(q, k, v, tables, scale, causal)[0].float()
                          - flex_o.float()).abs().max().item()  # fmt: skip
    row["fwd_max_abs_diff_vs_flex"] = diffs
    row["fwd"] = _timings(fwd)
    row["fwd_auto_config"] = {str(key): str(c) for key, c in op._FWD[0].cache.items()}
    if fwd_only:
        row["profile_fwd"] = _profile(fwd["exec_auto"])
        return row

    do = torch.randn_like(flex_o)
    ref = torch.autograd.grad(
        flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0], (q, k, v), do
    )

    def _rel(g: tuple[torch.Tensor, ...]) -> float:
        return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                   for a, b in zip(g, ref, strict=True))  # fmt: skip

    def _exec(dqc: triton.Config | None = None, dkc: triton.Config | None = None):  # type: ignore[no-untyped-def]
        o, lse = op.block_sparse_fwd_launch(q, k, v, tables, scale, causal)
        return op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, scale, causal, dq_config=dqc,
                                          dkdv_config=dkc)  # fmt: skip

    # forward + backward on every side (the executor's as its two launchers, so a schedule can be named)
    bwd: dict[str, Any] = {
        "cudnn": lambda: torch.autograd.grad(sdpa_dense(q, k, v, causal=causal, scale=scale), (q, k, v), do),
        "flex": lambda: torch.autograd.grad(
            flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0], (q, k, v), do
        ),
        "exec_auto": _exec,
    }
    rels: dict[str, float] = {"exec_auto": _rel(bwd["exec_auto"]())}
    sides = [(f"dq_{'x'.join(map(str, s))}", _config(s), _config(DKDV[0])) for s in DQ]
    sides += [(f"dkdv_{'x'.join(map(str, s))}", _config(DQ[0]), _config(s)) for s in DKDV]
    for label, dqc, dkc in sides:
        fn = lambda dqc=dqc, dkc=dkc: _exec(dqc, dkc)
        try:
            rels[label] = _rel(fn())
            bwd[label] = fn
        except Exception as e:
            rels[label] = float("nan")
            row.setdefault("refused", {})[label] = repr(e)[:200]
    row["grad_rel_diff_vs_flex"] = rels
    row["fwd_bwd"] = _timings(bwd)
    row["bwd_auto_config"] = {
        "dq": {str(key): str(c) for key, c in op._DQ[0].cache.items()},
        "dkdv": {str(key): str(c) for key, c in op._DKDV[0].cache.items()},
    }
    row["profile_fwd"] = _profile(fwd["exec_auto"])
    row["profile_fwd_bwd"] = _profile(bwd["exec_auto"])
    row["profile_flex_fwd_bwd"] = _profile(bwd["flex"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--points", default="random_nc,random_c,window")
    ap.add_argument("--fwd-only", action="store_true", help="the forward pass only (no backward sweep)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "commit": _commit(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
    }
    for name in args.points.split(","):
        try:
            row = run_point(name, fwd_only=args.fwd_only)
        except Exception:
            row = {"point": name, "error": traceback.format_exc()[-3000:]}
        doc["rows"].append(row)
        (out / "executor_schedules.json").write_text(json.dumps(doc, indent=1))
        summary = {k: v for k, v in row.items() if k in ("point", "block_density", "error")}
        if "fwd" in row:
            summary["fwd_ms"] = {s: round(t["median_ms"], 3) for s, t in row["fwd"].items()}
        if "fwd_bwd" in row:
            summary["fwd_bwd_ms"] = {s: round(t["median_ms"], 3) for s, t in row["fwd_bwd"].items()}
        print(json.dumps(summary), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
