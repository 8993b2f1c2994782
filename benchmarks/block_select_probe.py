"""Schedules of the block selection pass (``attnlab.kernels.block_select``) on block_topk's 128K grid:
each (rows per program, warps) checked equal to the PyTorch rule, then timed with CUDA events in
interleaved rounds (``measure_interleaved``, 20 calls each), beside the rule itself.

    PYTHONPATH=$PWD python benchmarks/block_select_probe.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnlab.bench.env import environment
from attnlab.bench.timing import measure_interleaved
from attnlab.kernels.block_select.naive import select_blocks_naive
from attnlab.kernels.block_select.op import select_blocks_kernel

SCHEDULES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=1024)
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = args.tiles if dev.type == "cuda" else 16
    score = torch.randn(1, args.heads if dev.type == "cuda" else 2, t, t, device=dev)
    kw = dict(n_q=t * 128, n_k=t * 128, block=128, topk=16, causal=True, sink=True, local=True)
    want = select_blocks_naive(score, **kw)  # type: ignore[arg-type]
    sides, checks = {"torch rule": lambda: select_blocks_naive(score, **kw)}, {}  # type: ignore[arg-type]
    for sch in SCHEDULES:
        got = select_blocks_kernel(score, schedule=sch, **kw)  # type: ignore[arg-type]
        checks[str(sch)] = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        if checks[str(sch)]:
            sides[str(sch)] = lambda sch=sch: select_blocks_kernel(score, schedule=sch, **kw)  # type: ignore[arg-type]
    times = measure_interleaved(sides, dev, min_reps=20, max_reps=20)
    rows = {
        k: {"median_ms": v.median_ms, "iqr_ms": v.iqr_ms, "equal": checks.get(k, True)}
        for k, v in times.items()
    }
    for k, v in rows.items():
        print(k, v, flush=True)
    print("not equal:", [k for k, ok in checks.items() if not ok])
    args.out.write_text(json.dumps({"environment": environment(dev), "grid": list(score.shape), "rows": rows,
                                    "checks": checks}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
