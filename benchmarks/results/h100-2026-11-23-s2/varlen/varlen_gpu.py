"""H100 check and timing of the executor's varlen path and of ``seer`` at full size (bf16, D=128, H=32).

    PYTHONPATH=$PWD python benchmarks/results/h100-2026-11-23-s2/varlen/varlen_gpu.py --out DIR

- ``varlen``: 16,384 packed tokens (H=32, H_kv=8, causal) in three sequence sets (8 x 2048; seven odd
  lengths including 1 and 77; 64 x 256). Checks: the varlen output against each sequence run alone on the
  executor (max abs difference), the last min(256, n) rows of every sequence against an fp32 reference
  (max abs error of varlen, of the one-by-one executor and of cuDNN per sequence), and the gradients of
  varlen against the one-by-one executor's (max abs difference / max abs). Timed (CUDA events, rotating
  rounds, attnlab.bench.timing.measure_interleaved): varlen forward with its tables prebuilt, the same
  sequences one by one on the executor (tables prebuilt, contiguous per-sequence tensors), cuDNN SDPA one
  by one; and the host cost of building the packed plan and tables (wall clock, synchronised).
- ``seer``: B=1, N=16,384, H=32, H_kv=8, weights D_gate=64 (random), block 64, topk 16, through
  ``attnlab.attention(..., backend="block_sparse", return_plan=True)``: the last 256 rows against an fp32
  reference over the returned plan's pairs; then the call as a user makes it timed against cuDNN dense.

Autotuning is off (each kernel's first config, the same for every executor side), to fit the time
allowance; the comparison varlen vs one by one runs the same kernel and config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.backends.varlen import block_sparse_varlen
from attnlab.bench.timing import measure_interleaved
from attnlab.kernels.block_sparse.op import block_sparse_attention
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans.executor import executor_tables, varlen_plan

#: VARLEN_SMOKE=1: a tiny CPU run (Triton's interpreter) that checks this script before the GPU run
SMOKE = os.environ.get("VARLEN_SMOKE") == "1"
DEV = torch.device("cpu" if SMOKE else "cuda")
H, HKV, D, BLOCK, ROWS, SEER_N = (4, 2, 16, 16, 8, 64) if SMOKE else (32, 8, 128, 128, 256, 16384)
SETS = {"8x2048": [2048] * 8, "odd7": [5000, 3001, 1, 77, 4096, 2500, 1709], "64x256": [256] * 64}
SEER_BLOCK = 64
if SMOKE:
    SETS = {"odd": [20, 1, 7, 33]}
    SEER_BLOCK = 16


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def ref_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r0: int, scale: float, mask=None):  # type: ignore[no-untyped-def]
    """fp32 causal (bottom-right) attention of rows r0.. of q (1, H, n, D) over k, v (1, H_kv, n, D);
    ``mask`` (H, rows, n) replaces the causal rule's pairs when given (and-ed with it)."""
    n = k.shape[2]
    kf = k.float().repeat_interleave(H // k.shape[1], 1)
    vf = v.float().repeat_interleave(H // v.shape[1], 1)
    s = (q[:, :, r0:].float() @ kf.transpose(-1, -2)) * scale
    rows = torch.arange(r0, q.shape[2], device=DEV)[:, None] + (n - q.shape[2])
    keep = torch.arange(n, device=DEV)[None, :] <= rows
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vf


def varlen_section(name: str, lengths: list[int]) -> dict[str, Any]:
    g = torch.Generator(device=DEV).manual_seed(0)
    t = sum(lengths)
    q = torch.randn(1, H, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    scale = D**-0.5
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
    builds = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        plan = varlen_plan(cu, cu, [None] * len(lengths), True, BLOCK, DEV)
        tables = executor_tables(plan).as_args()
        sync()
        builds.append((time.perf_counter() - t0) * 1e3)
    out, _ = block_sparse_attention(q, k, v, tables, scale, False)
    seqs = [(q[:, :, a:b].contiguous(), k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous())
            for a, b in itertools.pairwise(cu)]  # fmt: skip
    seq_tables = [
        executor_tables(varlen_plan([0, n], [0, n], [None], True, BLOCK, DEV)).as_args() for n in lengths
    ]
    alone = torch.cat(
        [block_sparse_attention(*s, tb, scale, False)[0] for s, tb in zip(seqs, seq_tables, strict=True)], 2
    )
    err: dict[str, float] = {"varlen": 0.0, "one_by_one": 0.0, "cudnn": 0.0}
    for (a, b), (qs, ks, vs) in zip(itertools.pairwise(cu), seqs, strict=True):
        r0 = max(0, (b - a) - ROWS)
        ref = ref_rows(qs, ks, vs, r0, scale)
        dense = sdpa_dense(qs, ks, vs, causal=True, scale=scale)[:, :, r0:]
        err["varlen"] = max(err["varlen"], float((out[:, :, a + r0 : b].float() - ref).abs().max()))
        err["one_by_one"] = max(err["one_by_one"], float((alone[:, :, a + r0 : b].float() - ref).abs().max()))
        err["cudnn"] = max(err["cudnn"], float((dense.float() - ref).abs().max()))
    res: dict[str, Any] = {
        "lengths": lengths,
        "total": t,
        "block_density": plan.block_density,
        "full_tiles": int(plan.full.sum()),
        "partial_tiles": int(plan.partial.sum()),
        "patterns": int(executor_tables(plan).patterns.shape[0]),
        "max_abs_varlen_vs_one_by_one": float((out.float() - alone.float()).abs().max()),
        "max_abs_err_vs_fp32_last_rows": err,
        "plan_build_ms": builds,
    }
    # backward: varlen against the one-by-one executor
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    do = torch.randn(out.shape, device=DEV, generator=g, dtype=torch.bfloat16)
    o1 = block_sparse_varlen(
        leaves[0], leaves[1], leaves[2], cu_t, cu_t, causal=True, scale=scale, block=BLOCK
    )[0]
    g1 = torch.autograd.grad(o1, leaves, do)
    leaves2 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o2 = torch.cat([block_sparse_attention(leaves2[0][:, :, a:b], leaves2[1][:, :, a:b], leaves2[2][:, :, a:b], tb,
                                           scale, False)[0] for (a, b), tb in zip(itertools.pairwise(cu), seq_tables, strict=True)], 2)  # fmt: skip
    g2 = torch.autograd.grad(o2, leaves2, do)
    res["grad_rel_diff_varlen_vs_one_by_one"] = {
        n: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for n, a, b in zip(("dq", "dk", "dv"), g1, g2, strict=True)
    }
    fns: dict[str, Callable[[], object]] = {
        "varlen": lambda: block_sparse_attention(q, k, v, tables, scale, False),
        "one_by_one": lambda: [
            block_sparse_attention(*s, tb, scale, False) for s, tb in zip(seqs, seq_tables, strict=True)
        ],
        "cudnn_one_by_one": lambda: [sdpa_dense(*s, causal=True, scale=scale) for s in seqs],
    }
    timings = measure_interleaved(fns, DEV, target_s=0.15, max_reps=30)
    res["fwd_ms"] = {
        n: {"median": tm.median_ms, "q1": tm.q1_ms, "q3": tm.q3_ms, "reps": tm.reps}
        for n, tm in timings.items()
    }
    res["speedup_varlen_over_one_by_one"] = timings["one_by_one"].median_ms / timings["varlen"].median_ms
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        block_sparse_varlen(q, k, v, cu_t, cu_t, causal=True, scale=scale, block=BLOCK)
    sync()
    res["varlen_as_called_ms"] = (time.perf_counter() - t0) * 1e3 / 3
    return res


def varlen_dynamic_section(lengths: list[int]) -> dict[str, Any]:
    """Per-sequence seer plans (identity gate, block 128, topk 8, per head) packed by varlen, against the
    same plans run one sequence at a time on the executor; forward timed both ways."""
    from attnlab.catalog.dynamic.seer import SeerParams, estimate

    g = torch.Generator(device=DEV).manual_seed(2)
    t = sum(lengths)
    q = torch.randn(1, H, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    scale = D**-0.5
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    bounds = list(itertools.pairwise(cu))
    params = SeerParams(block=BLOCK, topk=8)
    plans = [estimate(q[:, :, a:b], k[:, :, a:b], params, causal=True, scale=scale) for a, b in bounds]
    sync()
    t0 = time.perf_counter()
    packed = varlen_plan(cu, cu, list(plans), True, BLOCK, DEV)
    tables = executor_tables(packed).as_args()
    sync()
    build_ms = (time.perf_counter() - t0) * 1e3
    seqs = [
        (q[:, :, a:b].contiguous(), k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous()) for a, b in bounds
    ]
    seq_tables = [executor_tables(p).as_args() for p in plans]
    out = block_sparse_attention(q, k, v, tables, scale, False)[0]
    alone = torch.cat(
        [block_sparse_attention(*x, tb, scale, True)[0] for x, tb in zip(seqs, seq_tables, strict=True)], 2
    )
    fns: dict[str, Callable[[], object]] = {
        "varlen": lambda: block_sparse_attention(q, k, v, tables, scale, False),
        "one_by_one": lambda: [
            block_sparse_attention(*x, tb, scale, True) for x, tb in zip(seqs, seq_tables, strict=True)
        ],
    }
    timings = measure_interleaved(fns, DEV, target_s=0.15, max_reps=30)
    return {
        "lengths": lengths,
        "plan": "seer per sequence (identity gate, block 128, topk 8, per head)",
        "partial_tiles": int(packed.partial.sum()),
        "full_tiles": int(packed.full.sum()),
        "patterns": int(executor_tables(packed).patterns.shape[0]),
        "max_abs_varlen_vs_one_by_one": float((out.float() - alone.float()).abs().max()),
        "pack_plan_and_tables_ms": build_ms,
        "fwd_ms": {n: {"median": tm.median_ms, "q1": tm.q1_ms, "q3": tm.q3_ms} for n, tm in timings.items()},
    }


def seer_section() -> dict[str, Any]:
    g = torch.Generator(device=DEV).manual_seed(1)
    n = SEER_N
    q = torch.randn(1, H, n, D, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, n, D, device=DEV, generator=g, dtype=torch.bfloat16)
    w_q = torch.randn(H, D, 16 if SMOKE else 64, device=DEV, generator=g) * D**-0.5
    w_k = torch.randn(HKV, 3, D, 16 if SMOKE else 64, device=DEV, generator=g) * D**-0.5
    scale = D**-0.5
    out: dict[str, Any] = {}
    runs: list[tuple[str, dict[str, Any]]] = [("topk16", {}), ("threshold0.01", {"threshold": 0.01})]
    for label, extra in runs:
        res = attnlab.attention(q, k, v, method="seer", causal=True, backend="block_sparse", return_plan=True,
                                w_q=w_q, w_k=w_k, block=SEER_BLOCK, **extra)  # fmt: skip
        assert isinstance(res, attnlab.Result)
        plan = res.plan
        tiles = (plan.full | plan.partial)[0]  # (H, NQB, NKB)
        rows = torch.arange(n - ROWS, n, device=DEV)
        mask = tiles[:, rows // plan.block_q][:, :, torch.arange(n, device=DEV) // plan.block_k]
        ref = ref_rows(q, k, v, n - ROWS, scale, mask)
        out[label] = {
            "block_density": plan.block_density,
            "max_abs_err_last_rows": float((res.out[:, :, n - ROWS :].float() - ref).abs().max()),
            "ref_max_abs": float(ref.abs().max()),
        }

    def seer() -> torch.Tensor:
        return attnlab.attention(
            q, k, v, method="seer", causal=True, backend="block_sparse", w_q=w_q, w_k=w_k, block=SEER_BLOCK
        )

    def estimate() -> object:
        from attnlab.catalog.dynamic.seer import SeerParams
        from attnlab.catalog.dynamic.seer import estimate as est

        return est(q, k, SeerParams(block=SEER_BLOCK), causal=True, scale=scale, w_q=w_q, w_k=w_k)

    timings = measure_interleaved(
        {"seer_as_called": seer, "seer_estimate": estimate, "cudnn": lambda: sdpa_dense(q, k, v, causal=True, scale=scale)},
        DEV, target_s=0.15, max_reps=20,
    )  # fmt: skip
    out["fwd_ms"] = {
        n_: {"median": tm.median_ms, "q1": tm.q1_ms, "q3": tm.q3_ms, "reps": tm.reps}
        for n_, tm in timings.items()
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    attnlab.settings.autotune = False
    result: dict[str, Any] = {
        "commit": os.environ.get("ATTNLAB_COMMIT", "unknown"),
        "device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"H": H, "H_kv": HKV, "D": D, "dtype": "bfloat16", "block": BLOCK, "causal": True},
        "autotune": False,
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    sections = [(f"varlen_{k}", lambda k=k: varlen_section(k, SETS[k])) for k in SETS] + [
        ("seer", seer_section)
    ]
    dyn = [20, 1, 7, 33] if SMOKE else SETS["odd7"]
    sections.append(("varlen_seer_plans_odd7", lambda: varlen_dynamic_section(dyn)))
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-2000:]}
        result[name]["section_s"] = time.perf_counter() - t0
        print(name, json.dumps(result[name])[:1500], flush=True)
        (path / "varlen.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
