"""Where the retrieval_heads_kv step's time goes on a GPU: the decode kernel's RANGES mode alone, graphed,
L2 flushed, against cuDNN dense decode, for row mixes that separate the full row's read from the rest.

Sides (q (B, 4 * H_kv, 1, 128), cache (B, H_kv, N, 128) bf16, sink 4, window 4092):
``full1_of8`` (the step: KV head 0 full of 8), ``full1_of1`` (that full row alone: H_kv = 1),
``full8_of8`` (every row full: a dense read through RANGES), ``full0_of8`` (no full row),
``full1_of8_even`` (the step with its splits planned for every row of equal work: ``active_rows`` None).
Each side's output is checked against the naive twin over the same token lists first (B=1).

Usage: python benchmarks/decode_ranges_probe.py --out probe.json [--context 131072] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import FAILED, graph_of, kernel_profile, row, timed

from attnlab.bench.env import environment
from attnlab.kernels.decode import op
from attnlab.kernels.decode.naive import decode_attention_naive

SINK, BUDGET, D = 4, 4096, 128


def sides(b: int, n: int, dev: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, h_kv, n_full, planned in [
        ("full1_of8", 8, 1, True),
        ("full1_of1", 1, 1, True),
        ("full8_of8", 8, 8, True),
        ("full0_of8", 8, 0, True),
        ("full1_of8_even", 8, 1, False),
    ]:
        q = torch.randn(b, 4 * h_kv, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, h_kv, n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, h_kv, n, D, device=dev, dtype=torch.bfloat16)
        full = torch.zeros(b, h_kv, dtype=torch.bool, device=dev)
        full[:, :n_full] = True
        ranges = op.Ranges(full, None, SINK, n - (BUDGET - SINK))
        active = b * n_full if planned else None
        out[name] = (q, k, v, ranges, active)
    return out


def check(dev: torch.device, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name, (q, k, v, ranges, active) in sides(1, n, dev).items():
        got, lse = op.decode_ranges(q, k, v, ranges, D**-0.5, True, None, active)
        h_kv = k.shape[1]
        lists = torch.full((1, h_kv, n), -1, dtype=torch.int32, device=dev)
        stream = torch.cat([torch.arange(SINK), torch.arange(ranges.win, n)]).to(dev, torch.int32)
        for h in range(h_kv):
            toks = torch.arange(n, device=dev, dtype=torch.int32) if bool(ranges.full[0, h]) else stream
            lists[0, h, : toks.numel()] = toks
        want, want_lse = decode_attention_naive(q, k, v, lists, 1, D**-0.5, True)
        err = float((got.float() - want.float()).abs().max())
        res[name] = {"max_abs_err": err, "lse_err": float((lse - want_lse).abs().max()), "ok": err < 2e-2}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_ranges_probe needs a CUDA GPU")
    dev = torch.device("cuda")
    flush = torch.empty(256 * 2**20 // 4, device=dev, dtype=torch.float32)
    result: dict[str, Any] = {"env": environment(dev), "checks": check(dev, args.context), "batches": []}
    print(json.dumps(result["checks"]), flush=True)
    for b in args.batches:
        fns: dict[str, Any] = {}
        q8 = torch.randn(b, 32, 1, D, device=dev, dtype=torch.bfloat16)
        k8, v8 = (torch.randn(b, 8, args.context, D, device=dev, dtype=torch.bfloat16) for _ in range(2))

        def dense(q8: torch.Tensor = q8, k8: torch.Tensor = k8, v8: torch.Tensor = v8) -> object:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q8, k8, v8, scale=D**-0.5, enable_gqa=True)

        fns["dense_cudnn"] = graph_of(dense)
        for name, (q, k, v, ranges, active) in sides(b, args.context, dev).items():

            def step(q=q, k=k, v=v, ranges=ranges, active=active) -> object:  # type: ignore[no-untyped-def]
                return op.decode_ranges(q, k, v, ranges, D**-0.5, True, None, active)

            fns[name] = graph_of(step)
        times = timed(fns, args.reps, flush)
        profiles = {}
        for name, fn in fns.items():
            prof = kernel_profile(fn, flush, reps=10)
            profiles[name] = [(r["name"][:40], r["median_us"]) for r in prof["kernels"]]
        result["batches"].append(
            {"batch": b, "times": {k: row(t, None) for k, t in times.items()}, "kernels": profiles}
        )
        print(json.dumps(result["batches"][-1]), flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    result["failed_sides"] = FAILED
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
