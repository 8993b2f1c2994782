"""A/B of the executor's one-pass backward (the dK/dV kernel with FUSED_DQ, ``kernels/block_sparse/dq_reduce.py``)
against its two kernels.

    PYTHONPATH=$PWD python benchmarks/executor_fused_bwd.py --out DIR [--points random_nc,random_c,window]

At ``executor_schedules.py``'s points (32K, B=1, H=32, H_kv=8, D=128, bf16), first the gradients of every
executor side against FlexAttention's with the same plan (max abs difference over max abs value), then one
interleaved timing group (CUDA events, balanced rounds, >= 10 calls, spread kept) of:

- the backward alone (``bwd``): cuDNN through autograd over a saved graph (``retain_graph``), the executor's
  backward launcher given the forward's (O, lse): ``two_kernel`` (dK/dV then dQ, autotuned),
  ``one_pass_tma`` (dQ added by tensor-descriptor reductions, autotuned), ``one_pass_atomic`` (element-wise
  atomics; its own autotuning key) and the one-pass kernel at each of its first schedules;
- forward + backward through autograd (``fwd_bwd``): cuDNN, Flex, the executor as a user calls it with the
  two kernels and with the one-pass backward (``op.FUSED_BWD`` set around the call).

A torch.profiler pass splits each backward by kernel. Writes DIR/executor_fused_bwd.json (the commit and a
dirty-tree flag from ATTNLAB_COMMIT or git).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executor_schedules import _commit, _config, _point, _profile, _timings

import attnlab
from attnlab.kernels.block_sparse import op
from attnlab.kernels.block_sparse.op import block_sparse_attention
from attnlab.kernels.flex import flex_options, flex_run
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans.executor import executor_tables


@contextlib.contextmanager
def _setting(fused: bool, tma: bool = True) -> Iterator[None]:
    """The launcher's one-pass switch and its dQ-reduction kind, for the duration of a call."""
    saved = op.FUSED_BWD, op._dq_tma_ready
    op.FUSED_BWD = fused
    if not tma:
        op._dq_tma_ready = lambda q: False
    try:
        yield
    finally:
        op.FUSED_BWD, op._dq_tma_ready = saved


def run_point(name: str) -> dict[str, Any]:
    q, k, v, plan, causal = _point(name)
    scale = 128**-0.5
    row: dict[str, Any] = {
        "point": name,
        "n": q.shape[2],
        "causal": causal,
        "block_density": plan.block_density,
    }
    tables = tuple(executor_tables(plan).as_args())
    bm = plan.block_mask()
    opts = flex_options(q.shape[2], k.shape[2], True, q.device)
    attnlab.settings.autotune = True
    flex = lambda: flex_run(q, k, v, block_mask=bm, score_mod=None, scale=scale, options=opts)[0]
    do = torch.randn_like(q)
    ref = torch.autograd.grad(flex(), (q, k, v), do)
    with torch.no_grad():
        o, lse = op.block_sparse_fwd_launch(q, k, v, tables, scale, causal)

    def launch(fused: bool, tma: bool = True, config: triton.Config | None = None) -> Any:
        with _setting(fused, tma):
            return op.block_sparse_bwd_launch(do, q, k, v, o, lse, tables, scale, causal, fused=fused,
                                              dkdv_config=config)  # fmt: skip

    sides: dict[str, Any] = {
        "two_kernel": lambda: launch(False),
        "one_pass_tma": lambda: launch(True),
        "one_pass_atomic": lambda: launch(True, tma=False),
    }
    for shape in [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 2)]:
        cfg = _config(shape)
        sides["one_pass_" + "x".join(map(str, shape))] = lambda cfg=cfg: launch(True, config=cfg)
    rels: dict[str, Any] = {}
    for label, fn in list(sides.items()):
        try:
            got = fn()
            rels[label] = {f"d{n}": ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                           for n, a, b in zip("qkv", got, ref, strict=True)}  # fmt: skip
        except Exception as e:  # a schedule that does not launch: recorded, not timed
            rels[label] = repr(e)[:300]
            del sides[label]
    row["grad_rel_diff_vs_flex"] = rels
    dense = sdpa_dense(q, k, v, causal=causal, scale=scale)
    sides["cudnn"] = lambda: torch.autograd.grad(dense, (q, k, v), do, retain_graph=True)
    row["bwd"] = _timings(sides)
    row["auto_config"] = {str(key): str(c) for key, c in op._DKDV[0].cache.items()}

    def called(fused: bool) -> Any:
        with _setting(fused):
            out = block_sparse_attention(q, k, v, tables, scale, causal)[0]
            return torch.autograd.grad(out, (q, k, v), do)

    row["fwd_bwd"] = _timings(
        {
            "cudnn": lambda: torch.autograd.grad(
                sdpa_dense(q, k, v, causal=causal, scale=scale), (q, k, v), do
            ),
            "flex": lambda: torch.autograd.grad(flex(), (q, k, v), do),
            "exec_two_kernel": lambda: called(False),
            "exec_one_pass": lambda: called(True),
        }
    )
    row["profile_two_kernel"] = _profile(sides["two_kernel"])
    row["profile_one_pass"] = _profile(sides["one_pass_tma"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--points", default="random_nc,random_c,window")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"commit": _commit(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "rows": []}  # fmt: skip
    for name in args.points.split(","):
        try:
            row = run_point(name)
        except Exception:
            row = {"point": name, "error": traceback.format_exc()[-3000:]}
        doc["rows"].append(row)
        (out / "executor_fused_bwd.json").write_text(json.dumps(doc, indent=1))
        summary = {
            k: row[k] for k in ("point", "block_density", "error", "grad_rel_diff_vs_flex") if k in row
        }
        for mode in ("bwd", "fwd_bwd"):
            if mode in row:
                summary[mode] = {s: round(t["median_ms"], 3) for s, t in row[mode].items()}
        print(json.dumps(summary), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
