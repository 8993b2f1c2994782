"""The block-sparse executor against FlexAttention running the same plan and cuDNN dense (issue 8 targets).

    PYTHONPATH=$PWD python benchmarks/block_sparse_bench.py --out DIR [--quick]

Sections (each guarded; a failure is recorded in its place; DIR/block_sparse.json rewritten after each):

- ``random``: random per-head block plans (B=1 and B=4, H=32, D=128, bf16; the causal diagonal tiles
  partial, the local tile always kept) at block densities ~0.05/0.1/0.25, 16K and 32K, causal and not.
  Sides, timed in rotating rounds with CUDA events (attnlab.bench.timing.measure_interleaved, >= 10
  calls each, spread kept): cuDNN SDPA dense, FlexAttention with the plan's BlockMask (compiled), and the
  executor (``block_sparse_attention`` with the plan's tables; tables built before timing, as a prepared
  static op has them). Labelled "kernel" sides: both take a prebuilt plan. Also the backward pass alone
  (``bwd``: autograd over a saved graph, cuDNN and the executor; Flex's compiled backward refuses a
  retained graph).
- ``dynamic``: block_topk (causal, top-k = N/1024 blocks of 128, ~1/8 of the causal tiles) as a user
  calls it (estimation, tables and executor), its estimator alone, and cuDNN dense, forward, 32K-128K.
- ``static``: sliding_window (1024 at 32K, 2048 at 64K) as a user calls it, ``attnlab.attention(...,
  backend="block_sparse")`` and ``backend="flex"`` against cuDNN dense, causal, B=1 H=32 D=128.

Before timing, each point checks correctness at that exact configuration: the outputs of the executor
and FlexAttention on the last 256 queries against an fp32 reference over the plan's pairs (max abs error
of each), and the executor's gradients against FlexAttention's (max abs difference over max abs value).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import traceback
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.timing import measure_interleaved
from attnlab.kernels.block_sparse.op import block_sparse_attention
from attnlab.kernels.flex import flex_options, flex_run
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans import Plan
from attnlab.plans.executor import executor_tables

DEV = torch.device("cuda")
BLOCK = 128
CHECK_ROWS = 256


def random_plan(h: int, n: int, causal: bool, density: float, seed: int) -> Plan:
    """Per-head random tiles (kept with probability ``density`` among the causal ones), the diagonal tile
    always kept; causal: diagonal tiles partial with the causal rule."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nb = n // BLOCK
    full = torch.rand(1, h, nb, nb, generator=g, device=DEV) < density
    eye = torch.eye(nb, dtype=torch.bool, device=DEV)
    if causal:
        below = torch.ones(nb, nb, dtype=torch.bool, device=DEV).tril(-1)
        full = full & below
        partial = eye.expand(1, h, nb, nb).clone()

        def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
            return kv_idx <= q_idx

    else:
        full = full | eye
        partial = torch.zeros_like(full)
        mask_mod = None
    return Plan(n, n, causal, BLOCK, BLOCK, full, partial, mask_mod, kind="dynamic")


def rows_mask(plan: Plan, r0: int, r1: int) -> torch.Tensor:
    """The plan's token mask for query rows [r0, r1) (H, r1 - r0, N), from its tiles and rule."""
    rows = torch.arange(r0, r1, device=DEV)
    cols = torch.arange(plan.n_k, device=DEV)
    full = plan.full[0][:, rows // BLOCK][:, :, cols // BLOCK]
    part = plan.partial[0][:, rows // BLOCK][:, :, cols // BLOCK]
    if plan.mask_mod is not None:
        part = part & plan.mask_mod(None, None, rows[:, None], cols[None, :])[None]
    return full | part


def check(q, k, v, plan: Plan, tables, bm, causal: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    scale = q.shape[-1] ** -0.5
    n = q.shape[2]
    r0 = n - CHECK_ROWS
    m = rows_mask(plan, r0, n)[None]
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, 1)
    vf = v.float().repeat_interleave(g, 1)
    s = (q[:, :, r0:].float() @ kf.transpose(-1, -2)) * scale
    ref = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ vf
    del s
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ours, _ = block_sparse_attention(qs, ks, vs, tables, scale, causal)
    qf, kf2, vf2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    flex, _ = flex_run(qf, kf2, vf2, block_mask=bm, score_mod=None, scale=scale,
                       options=flex_options(n, n, g > 1, DEV))  # fmt: skip
    out = {
        "ours_out_err": (ours[:, :, r0:].float() - ref).abs().max().item(),
        "flex_out_err": (flex[:, :, r0:].float() - ref).abs().max().item(),
    }
    do = torch.randn_like(ours)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(ours, (qs, ks, vs), do),
                          torch.autograd.grad(flex, (qf, kf2, vf2), do), strict=True):  # fmt: skip
        out[f"{name}_rel_diff_vs_flex"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    return out


def timing_row(fns: dict[str, Any]) -> dict[str, Any]:
    res = measure_interleaved(fns, DEV, warmup=3, target_s=0.4, min_reps=10, max_reps=40)
    return {
        name: {
            "median_ms": t.median_ms,
            "min_ms": t.min_ms,
            "q1_ms": t.q1_ms,
            "q3_ms": t.q3_ms,
            "reps": t.reps,
        }
        for name, t in res.items()
    }


def sides(q, k, v, tables, bm, causal: bool, mode: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    scale = q.shape[-1] ** -0.5
    n, g = q.shape[2], q.shape[1] // k.shape[1]
    opts = flex_options(n, n, g > 1, DEV)
    run = {
        "cudnn_dense": lambda: sdpa_dense(q, k, v, causal=causal, scale=scale),
        "flex_same_plan": lambda: flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[
            0
        ],
        "executor": lambda: block_sparse_attention(q, k, v, tables, scale, causal)[0],
    }
    if mode == "fwd":
        return run
    do = torch.randn_like(q)
    if mode == "bwd":
        # the backward pass alone over a saved graph, the same way on both sides; FlexAttention's compiled
        # backward refuses a retained graph (donated buffers), so it has no side here
        outs = {name: run[name]() for name in ("cudnn_dense", "executor")}
        return {
            name: (lambda o=o: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            for name, o in outs.items()
        }

    def fwd_bwd(fn):  # type: ignore[no-untyped-def]
        return lambda: torch.autograd.grad(fn(), (q, k, v), do)

    return {name: fwd_bwd(fn) for name, fn in run.items()}


def section_random(quick: bool) -> list[dict[str, Any]]:
    rows = []
    points = [(1, 16384), (1, 32768), (4, 16384)] if not quick else [(1, 4096)]
    densities = (0.05, 0.1, 0.25) if not quick else (0.1,)
    for b, n in points:
        for causal in (True, False):
            for density in densities if b == 1 else (0.1,):
                row: dict[str, Any] = {"b": b, "h": 32, "h_kv": 8, "n": n, "d": 128, "causal": causal}
                try:
                    torch.manual_seed(n)
                    q = torch.randn(b, 32, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                    k, v = (torch.randn(b, 8, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                            for _ in range(2))  # fmt: skip
                    # causal plans keep ~half the tiles below the diagonal: ask for 2x there
                    plan = random_plan(32, n, causal, min(1.0, density * (2 if causal else 1)), seed=n)
                    row["block_density"] = plan.block_density
                    row["target_density"] = density
                    tables = executor_tables(plan).as_args()
                    bm = plan.block_mask()
                    row["check"] = check(q, k, v, plan, tables, bm, causal)
                    for mode in ("fwd", "fwd_bwd", "bwd"):
                        row[mode] = timing_row(sides(q, k, v, tables, bm, causal, mode))
                    print(json.dumps(row), flush=True)
                except Exception:
                    row["error"] = traceback.format_exc()[-2000:]
                    print(row["error"], flush=True)
                rows.append(row)
                torch.cuda.empty_cache()
    return rows


def static_point(n: int, window: int) -> dict[str, Any]:
    row: dict[str, Any] = {"method": "sliding_window", "window": window, "n": n, "b": 1, "h": 32, "d": 128}
    q = torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    call = {"method": "sliding_window", "causal": True, "window": window}
    res = attnlab.attention(q, k, v, backend="block_sparse", return_plan=True, **call)
    row["density"] = res.plan.density
    row["block_density_128"] = res.plan.block_density
    flex = attnlab.attention(q, k, v, backend="flex", **call)
    row["max_abs_diff_vs_flex"] = (res.out.float() - flex.float()).abs().max().item()
    run = {
        "cudnn_dense": lambda: sdpa_dense(q, k, v, causal=True, scale=128**-0.5),
        "flex_as_called": lambda: attnlab.attention(q, k, v, backend="flex", **call),
        "executor_as_called": lambda: attnlab.attention(q, k, v, backend="block_sparse", **call),
    }
    row["fwd"] = timing_row(run)
    do = torch.randn_like(q)
    row["fwd_bwd"] = timing_row(
        {name: (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), do)) for name, fn in run.items()}
    )
    return row


def section_static(quick: bool) -> list[dict[str, Any]]:
    rows = []
    points = [(32768, 1024), (65536, 2048)] if not quick else [(4096, 256)]
    for n, window in points:
        try:
            row = static_point(n, window)
            print(json.dumps(row), flush=True)
        except Exception:
            row = {"n": n, "window": window, "error": traceback.format_exc()[-2000:]}
            print(row["error"], flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def dynamic_point(n: int, topk: int) -> dict[str, Any]:
    from attnlab.catalog.dynamic.block_topk import BlockTopkParams, estimate

    row: dict[str, Any] = {"method": "block_topk", "topk": topk, "n": n, "b": 1, "h": 32, "d": 128}
    q = torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    call = {"method": "block_topk", "causal": True, "topk": topk}
    res = attnlab.attention(q, k, v, return_plan=True, **call)
    row["block_density"] = res.plan.block_density
    params = BlockTopkParams(topk=topk)
    run = {
        "cudnn_dense": lambda: sdpa_dense(q, k, v, causal=True, scale=128**-0.5),
        "block_topk_as_called": lambda: attnlab.attention(q, k, v, **call),
        "estimate_only": lambda: estimate(q, k, params, causal=True, scale=128**-0.5),
    }
    row["fwd"] = timing_row(run)
    return row


def section_dynamic(quick: bool) -> list[dict[str, Any]]:
    rows = []
    points = [(32768, 32), (65536, 64), (131072, 128)] if not quick else [(4096, 4)]
    for n, topk in points:
        try:
            row = dynamic_point(n, topk)
            print(json.dumps(row), flush=True)
        except Exception:
            row = {"n": n, "topk": topk, "error": traceback.format_exc()[-2000:]}
            print(row["error"], flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="static,random")
    args = ap.parse_args()
    attnlab.settings.autotune = True
    torch._dynamo.config.recompile_limit = 256
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = Path("ATTNLAB_COMMIT").read_text().strip() if Path("ATTNLAB_COMMIT").exists() else "unknown"
    doc: dict[str, Any] = {
        "commit": commit,
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "nvidia_smi": subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem", "--format=csv"], capture_output=True, text=True
        ).stdout,
    }
    for name in args.sections.split(","):
        fn = {"random": section_random, "static": section_static, "dynamic": section_dynamic}[name]
        try:
            doc[name] = fn(args.quick)
        except Exception:
            doc[name] = {"error": traceback.format_exc()}
        (out / "block_sparse.json").write_text(json.dumps(doc, indent=1))
    print("done; ideal speedup = 1 / block density")


if __name__ == "__main__":
    main()
