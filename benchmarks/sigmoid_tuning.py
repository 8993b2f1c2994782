"""Sweep the FlashSigmoid forward's tile configs and tile paths on the GPU, against cuDNN SDPA softmax.

    python benchmarks/sigmoid_tuning.py --out tuning.json

For each length and mask (bf16, D=128, H=32, B=1) it times cuDNN's softmax forward, then the forward kernel
launched directly (no autotuner) for every (BLOCK_M, BLOCK_N, warps, stages) in CONFIGS, with tiles moved
by tensor descriptors (TMA) and by pointer loads. (The 2026-11-22 run, at commit 424d5eb, also tried causal
query blocks in reversed order: 0-1.5% slower, so that option was dropped. The run at commit d10d7a2 tried a
persistent grid of 1-3 programs per multiprocessor: 0.56-0.78 of cuDNN against 0.90-1.03 for the plain
grid, so that was dropped too; results under benchmarks/results/h100-2026-11-22/superseded/.)
Every variant's output is compared with the pointer path's first config (same math, so they agree to
bf16 rounding); a variant that disagrees is marked wrong. This decides the autotune list in op.py.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
from torch.nn.attention import SDPBackend

from attnlab.bench.env import environment
from attnlab.bench.timing import attention_flops
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.kernels.sigmoid import op
from attnlab.kernels.sigmoid.fwd import sigmoid_fwd_kernel
from attnlab.masks import dense_pairs

CONFIGS = [
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 2), (128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5),
    (64, 64, 4, 3), (64, 128, 4, 3), (256, 64, 8, 2), (256, 64, 8, 3), (256, 32, 8, 3),
]  # fmt: skip


def launch(q, k, v, o, causal: bool, cfg: tuple, tma: bool) -> None:  # type: ignore[no-untyped-def]
    bm, bn, warps, stages = cfg
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if tma:
        tiles = []
        for t, rows in ((q, bm), (k, bn), (v, bn), (o, bm)):
            tiles.append(op.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d]))
    else:
        tiles = [q, k, v, o]
    sigmoid_fwd_kernel[(triton.cdiv(n_q, bm), b * h)](
        *tiles, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        h, h // k.shape[1], n_q, n_k, n_k - n_q, d, d**-0.5, -math.log(n_k), 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, CAUSAL=causal, FAST=True, DOT_PREC="tf32", UPCAST=False,
        TMA=tma, EVEN_M=n_q % bm == 0, EVEN_N=n_k % bn == 0, EVEN_D=True,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def bench(fn) -> float:  # type: ignore[no-untyped-def]
    return float(triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median"))


def sweep(n: int, causal: bool, heads: int, d: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    flops = attention_flops(1, heads, n, n, d, d, dense_pairs(n, n, causal), "fwd")
    t_cudnn = bench(
        lambda: sdpa_dense(q, k, v, causal=causal, scale=d**-0.5, kernels=[SDPBackend.CUDNN_ATTENTION])
    )
    base = torch.empty_like(q)
    launch(q, k, v, base, causal, CONFIGS[0], False)
    rows = []
    for cfg in CONFIGS:
        for tma in (True, False):
            row = {"n": n, "causal": causal, "config": cfg, "tma": tma}
            o = torch.empty_like(q)
            try:
                launch(q, k, v, o, causal, cfg, tma)
                torch.cuda.synchronize()
                err = (o.float() - base.float()).abs().max().item()
                t = bench(lambda o=o, cfg=cfg, tma=tma: launch(q, k, v, o, causal, cfg, tma))
                row.update(ms=t, tflops=flops / t / 1e9, ratio=t_cudnn / t, max_diff=err, wrong=err > 2e-2)
            except Exception as e:  # e.g. out of shared memory for a config
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    ok = [r for r in rows if "ms" in r and not r["wrong"]]
    best = min(ok, key=lambda r: r["ms"])
    print(
        f"n={n} causal={causal} cudnn {t_cudnn:.3f} ms ({flops / t_cudnn / 1e9:.0f} TF/s); best {best['config']} "
        f"tma={best['tma']} {best['ms']:.3f} ms ratio {best['ratio']:.3f}",
        flush=True,
    )
    for r in sorted(ok, key=lambda r: r["ms"])[:6]:
        print(
            "   ",
            r["config"],
            "tma" if r["tma"] else "ptr",
            f"{r['ratio']:.3f}",
        )
    bad = [r for r in rows if "error" in r or r.get("wrong")]
    for r in bad:
        print("   failed", r["config"], r["tma"], r.get("error", f"max diff {r.get('max_diff')}"))
    return [{"n": n, "causal": causal, "cudnn_ms": t_cudnn, "cudnn_tflops": flops / t_cudnn / 1e9}, *rows]


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
