"""Decode through SDPA as a model's cache grows: every step has a new key length. Does cuDNN pay its
per-shape planning at every step? Times one query (B=1 and 8, H=32, H_kv=8, D=128, bf16) against a cache
that grows by one token per step, for each SDPA kernel, and the same kernels at a fixed length.

    python benchmarks/decode_sdpa_probe.py --out decode_sdpa.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnlab.bench.env import environment

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def step_times(kernel: SDPBackend, b: int, n0: int, steps: int, grow: bool) -> list[float]:
    """Wall ms per call (synchronised) of one decode query against n0 (+ i when growing) keys."""
    torch.manual_seed(0)
    k = torch.randn(b, 8, n0 + steps, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = []
    with sdpa_kernel([kernel]):
        for i in range(steps):
            n = n0 + (i if grow else 0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,32768,131072")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("decode_sdpa.json"))
    args = ap.parse_args()
    rows = []
    for b in (1, 8):
        for n0 in (int(x) for x in args.lengths.split(",")):
            for name, kernel in KERNELS.items():
                try:
                    fixed = step_times(kernel, b, n0, args.steps, grow=False)
                    grow = step_times(kernel, b, n0 + args.steps, args.steps, grow=True)
                except RuntimeError as e:
                    rows.append({"b": b, "n": n0, "kernel": name, "error": str(e)[:200]})
                    continue
                row = {"b": b, "n": n0, "kernel": name,
                       "fixed_median_ms": statistics.median(fixed[2:]), "fixed_first_ms": fixed[0],
                       "growing_median_ms": statistics.median(grow), "growing_ms": grow}  # fmt: skip
                rows.append(row)
                print(
                    b,
                    n0,
                    name,
                    round(row["fixed_median_ms"], 3),
                    round(row["growing_median_ms"], 3),
                    flush=True,
                )
    args.out.write_text(json.dumps({"env": environment(torch.device("cuda")), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
