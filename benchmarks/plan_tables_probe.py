"""The executor's table compaction (``plans.executor._ordered``) against the argsort it replaced, on the device:
the same first ``num`` entries, and the time of each (CUDA events, interleaved, medians of 20) on tile grids of a
block_topk plan at 32K-128K (H_kv = 8 heads, 128 x 128 tiles). ``python benchmarks/plan_tables_probe.py --out F``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnlab.bench.env import environment
from attnlab.bench.timing import measure_interleaved
from attnlab.plans.executor import _ordered


def argsorted(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = blocks.sum(dim=-1, dtype=torch.int32)
    width = max(1, int(num.max()))
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
    return num, idx.to(torch.int32).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for n in (32768, 65536, 131072):
        t = n // 128
        g = torch.Generator(device="cpu").manual_seed(0)
        blocks = (torch.rand(1, 8, t, t, generator=g) < 0.03).tril().to(dev)  # ~3% of causal tiles (topk 16)
        num, idx, _ = _ordered(blocks, None)
        num0, idx0 = argsorted(blocks)
        keep = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        same = bool(torch.equal(num, num0)) and bool(torch.equal(idx[keep], idx0[keep]))
        times = measure_interleaved(
            {"compaction": lambda b=blocks: _ordered(b, None), "argsort": lambda b=blocks: argsorted(b)},
            dev,
            min_reps=20,
            max_reps=20,
        )
        rows.append({"n": n, "tiles": t, "same": same, **{k: v.median_ms for k, v in times.items()},
                     **{f"{k}_iqr": v.iqr_ms for k, v in times.items()}})  # fmt: skip
        print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"environment": environment(dev), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
