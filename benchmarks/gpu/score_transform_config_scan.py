"""Every backward schedule of the score-transform kernels at one shape, against fp32 autograd (GPU).

``attnlab verify --device cuda`` at 5e7f2db failed ``sink/triton`` at noncausal 257 x 257, D=64, bf16 (dq,
dk, dv wrong by 0.27 to 583 while the output was right; every other case passed). The backward's
schedule there is Triton's autotuner's pick among ``DKDV_SHAPES`` x ``DQ_SHAPES``. This runs the forward,
then the backward under each pair of candidates named explicitly, with and without sinks, causal and not,
and prints each pair's largest gradient error against the same math in fp32 autograd (the inputs' bf16
values upcast), beside the error of bf16 autograd (the precision floor).

Usage: python benchmarks/gpu/score_transform_config_scan.py --out scan.json [--n 257] [--d 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from attnlab.bench.env import environment
from attnlab.kernels.score_transform import op


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, causal: bool,
               scale: float, do: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:  # fmt: skip
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    x = (qq @ kk.repeat_interleave(g, 1).transpose(-1, -2)).float() * scale
    if causal:
        n_q, n_k = x.shape[-2:]
        keep = (
            torch.arange(n_k, device=x.device)[None, :]
            <= torch.arange(n_q, device=x.device)[:, None] + n_k - n_q
        )
        x = x.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        x = torch.cat([x, sinks.float()[None, :, None, None].expand(*x.shape[:3], 1)], -1)
    p = torch.softmax(x, -1)[..., : k.shape[2]]
    out = (p.to(dtype) @ vv.repeat_interleave(g, 1)).float()
    grads = torch.autograd.grad(out, (qq, kk, vv), do.float())
    return [t.float() for t in grads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=257)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--forward-only", action="store_true", help="only the forward's schedules")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, h, h_kv, n, d = 2, 4, 2, args.n, args.d
    scale = d**-0.5
    q = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, h_kv, n, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, h_kv, n, d, device=dev, dtype=torch.bfloat16)
    do = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
    sink_vals = torch.randn(h, device=dev)
    result: dict[str, Any] = {"env": environment(dev), "shape": [b, h, h_kv, n, d], "cases": []}
    dkdv = [op._bwd_config(s) for s in op.DKDV_SHAPES[:-1]]  # (the last: fp32 only)
    dq = [op._bwd_config(s) for s in op.DQ_SHAPES[:-1]]
    for causal in () if args.forward_only else (False, True):
        for sinks in (sink_vals, None):
            out, lse = op.score_transform_fwd_launch(q, k, v, None, sinks, scale, 0.0, causal)
            ref = _reference(q, k, v, sinks, causal, scale, do, torch.float32)
            low = _reference(q, k, v, sinks, causal, scale, do, torch.bfloat16)
            floor = [float((a - r).abs().max()) for a, r in zip(low, ref, strict=True)]
            for c1 in dkdv:
                for c2 in dq:
                    row: dict[str, Any] = {"causal": causal, "sinks": sinks is not None,
                                           "dkdv": op._shape_of(c1), "dq": op._shape_of(c2)}  # fmt: skip
                    try:
                        g = op.score_transform_bwd_launch(
                            do, q, k, v, out, lse, None, sinks, scale, 0.0, causal, configs=(c1, c2)
                        )
                        errs = [float((a.float() - r).abs().max()) for a, r in zip(g[:3], ref, strict=True)]
                        row.update(err=errs, bf16_floor=floor, ok=all(e <= 3 * f + 1e-2 for e, f in
                                                                       zip(errs, floor, strict=True)))  # fmt: skip
                    except Exception as e:  # (a schedule that does not launch is recorded)
                        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                    result["cases"].append(row)
                    if not row.get("ok"):
                        print(json.dumps(row), flush=True)
    # the forward's own schedules: out and lse of each against fp32 (the backward reads the lse)
    result["forward"] = []
    for n_f, d_f in ((n, d), (1000, 128), (4096, 128)):
        qf = torch.randn(b, h, n_f, d_f, device=dev, dtype=torch.bfloat16)
        kf, vf = (torch.randn(b, h_kv, n_f, d_f, device=dev, dtype=torch.bfloat16) for _ in range(2))
        g = h // h_kv
        for causal in (False, True):
            x = (qf.float() @ kf.float().repeat_interleave(g, 1).transpose(-1, -2)) * d_f**-0.5
            if causal:
                keep = torch.ones(n_f, n_f, dtype=torch.bool, device=dev).tril()
                x = x.masked_fill(~keep, float("-inf"))
            ref_lse = x.logsumexp(-1)
            ref_out = torch.softmax(x, -1) @ vf.float().repeat_interleave(g, 1)
            for shape in op.FWD_SHAPES[:-1]:
                cfg = op._fwd_config(shape)
                row = {"n": n_f, "d": d_f, "causal": causal, "config": list(shape)}
                try:
                    o, lse = op.score_transform_fwd_launch(
                        qf, kf, vf, None, None, d_f**-0.5, 0.0, causal, config=cfg
                    )
                    row.update(out_err=float((o.float() - ref_out).abs().max()),
                               lse_err=float((lse - ref_lse).abs().max()))  # fmt: skip
                    row["ok"] = row["out_err"] < 2e-2 and row["lse_err"] < 1e-2
                except Exception as e:
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                result["forward"].append(row)
                print(json.dumps(row), flush=True)
    bad = [r for r in result["cases"] if not r.get("ok")]
    print(f"{len(result['cases'])} schedule pairs, {len(bad)} wrong or failed", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
