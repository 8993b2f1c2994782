"""Sweep the FlashSigmoid forward's schedules on the GPU, against cuDNN SDPA softmax.

    python benchmarks/sigmoid_tuning.py --out tuning.json

For each length and mask (bf16, D=128, H=32, B=1) it launches the forward kernel directly (no autotuner)
with every (BLOCK_M, BLOCK_N, warps, stages, SPLIT, WS) in CONFIGS, with tiles moved by in-kernel tensor
descriptors (TMA) and by pointer loads, and times all of them and cuDNN's softmax forward in interleaved
rounds (``measure_interleaved``: every variant sees the same clock). Every variant's output is compared
with the pointer path's first config (same math, so they agree to bf16 rounding); a variant that disagrees
is marked wrong and a variant that fails to compile records its error. This decides op.FWD_SHAPES.

Earlier runs (benchmarks/results/h100-2026-11-22/): at commit 424d5eb 17 plain tile configs x {host
descriptors, pointers} (128x64, 4 warps, 2 stages won) and reversed causal block order (0-1.5% slower,
dropped); at d10d7a2 a persistent grid (0.56-0.78 of cuDNN, dropped, under superseded/); at a908825
benchmarks/sigmoid_probe.py found the split query tile and warp specialization (0.95-1.00 of cuDNN).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from torch.nn.attention import SDPBackend

from attnlab.bench.env import environment
from attnlab.bench.timing import attention_flops, measure_interleaved
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.kernels.sigmoid import op
from attnlab.masks import dense_pairs

CONFIGS = [
    (128, 64, 4, 2, 1, False), (128, 64, 4, 2, 2, False), (128, 64, 4, 2, 1, True), (128, 64, 4, 3, 2, False),
    (128, 64, 4, 3, 1, True), (128, 32, 4, 3, 2, False), (128, 128, 4, 2, 2, False), (256, 64, 8, 2, 2, False),
    (128, 64, 4, 2, 2, True), (128, 32, 4, 3, 1, False), (64, 64, 4, 3, 1, False),
]  # fmt: skip


def config(shape: tuple) -> triton.Config:
    m, n, w, s, split, ws = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": split, "WS": ws}, num_warps=w, num_stages=s)


def launch(q, k, v, causal: bool, shape: tuple, tma: bool):  # type: ignore[no-untyped-def]
    before, op.USE_TMA = op.USE_TMA, tma
    try:
        return op.sigmoid_fwd_launch(
            q, k, v, q.shape[-1] ** -0.5, -math.log(k.shape[2]), causal, config(shape)
        )
    finally:
        op.USE_TMA = before


def name(shape: tuple, tma: bool) -> str:
    m, n, w, s, split, ws = shape
    return f"{m}x{n}_w{w}s{s}_split{split}{'_ws' if ws else ''}_{'tma' if tma else 'ptr'}"


def sweep(n: int, causal: bool, heads: int, d: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    flops = attention_flops(1, heads, n, n, d, d, dense_pairs(n, n, causal), "fwd")
    base = launch(q, k, v, causal, CONFIGS[0], False)
    fns = {
        "cudnn": lambda: sdpa_dense(
            q, k, v, causal=causal, scale=d**-0.5, kernels=[SDPBackend.CUDNN_ATTENTION]
        )
    }
    rows: dict[str, dict] = {}
    for shape in CONFIGS:
        for tma in (True, False):
            if shape[5] and not tma:
                continue  # warp specialization needs the descriptors
            key = name(shape, tma)
            row = {"n": n, "causal": causal, "variant": key, "config": shape, "tma": tma}
            try:
                o = launch(q, k, v, causal, shape, tma)
                torch.cuda.synchronize()
                err = (o.float() - base.float()).abs().max().item()
                row.update(max_diff=err, wrong=err > 2e-2)
                if not row["wrong"]:
                    fns[key] = lambda shape=shape, tma=tma: launch(q, k, v, causal, shape, tma)
            except Exception as e:  # compile failures, shared memory overflow
                last = (str(e).strip().splitlines() or [""])[-1]
                row["error"] = f"{type(e).__name__}: {last[:200]}"
            rows[key] = row
    times = measure_interleaved(fns, torch.device("cuda"), warmup=2, target_s=3.0, min_reps=5, max_reps=30)
    t_cudnn = times.pop("cudnn").median_ms
    for key, t in times.items():
        rows[key].update(ms=t.median_ms, tflops=flops / t.median_ms / 1e9, ratio=t_cudnn / t.median_ms)
    ok = sorted((r for r in rows.values() if "ms" in r), key=lambda r: r["ms"])
    print(f"n={n} causal={causal} cudnn {t_cudnn:.3f} ms ({flops / t_cudnn / 1e9:.0f} TF/s)", flush=True)
    for r in ok:
        print(f"    {r['variant']:<34} {r['ms']:8.3f} ms {r['tflops']:5.0f} TF/s ratio {r['ratio']:.3f}")
    for r in rows.values():
        if "ms" not in r:
            print("   failed", r["variant"], r.get("error", f"max diff {r.get('max_diff')}"), flush=True)
    return [
        {"n": n, "causal": causal, "cudnn_ms": t_cudnn, "cudnn_tflops": flops / t_cudnn / 1e9},
        *rows.values(),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sigmoid_tuning.json")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    rows: list[dict] = []
    env = environment(torch.device("cuda"))
    for n in (int(x) for x in args.lengths.split(",")):
        for causal in (False, True):
            rows += sweep(n, causal, args.heads, args.head_dim)
            with open(args.out, "w") as f:  # after every shape, so a run cut short keeps what it measured
                json.dump({"env": env, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
