"""Where the block-sparse executor's backward spends its time (kernel-only probe, not a headline figure).

    PYTHONPATH=$PWD python benchmarks/block_sparse_probe.py

At 32K, B=1 H=32 H_kv=8 D=128 bf16, a random non-causal plan at block density ~0.1: the forward, the
whole backward, and FlexAttention's forward and backward with the same plan, each timed alone with CUDA
events (median of 20 after warm-up), plus the autotuner's choices.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_sparse_bench import random_plan

import attnlab
from attnlab.kernels.block_sparse import op
from attnlab.kernels.flex import flex_options, flex_run
from attnlab.plans.executor import executor_tables


def timed(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main() -> None:
    attnlab.settings.autotune = True
    n, dev = 32768, "cuda"
    q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    plan = random_plan(32, n, False, 0.1, seed=1)
    tables = executor_tables(plan).as_args()
    scale = 128**-0.5
    o, lse = op.block_sparse_fwd_launch(q, k, v, tables, scale, False)
    do = torch.randn_like(o)
    bm = plan.block_mask()
    opts = flex_options(n, n, True, torch.device(dev))
    print("block density", plan.block_density)
    print("executor fwd ms", timed(lambda: op.block_sparse_fwd_launch(q, k, v, tables, scale, False)))
    print(
        "executor bwd ms",
        timed(lambda: op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, scale, False)),
    )
    print(
        "flex fwd ms",
        timed(lambda: flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)),
    )
    print(
        "flex fwd+bwd ms",
        timed(
            lambda: torch.autograd.grad(
                flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0], (q, k, v), do
            )
        ),
    )
    print(
        "executor fwd+bwd ms",
        timed(
            lambda: torch.autograd.grad(
                op.block_sparse_attention(q, k, v, tables, scale, False)[0], (q, k, v), do
            )
        ),
    )
    for name, kern in (("fwd", op._FWD[0]), ("dq", op._DQ[0]), ("dkdv", op._DKDV[0])):
        print(name, "config", {str(key): str(c) for key, c in kern.cache.items()})


if __name__ == "__main__":
    main()
