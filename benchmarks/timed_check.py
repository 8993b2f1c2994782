"""Correct where it is timed: each (method, backend) of a benchmark run checked at the timed shape itself.

The benchmark's own pre-timing check runs on a small case (384 tokens) of the run's dtype and head dim; this
script runs the exact configuration a run timed (length, heads, head dim, dtype, the backend's autotuned
long-sequence schedule) through ``attnlab.attention`` with that backend forced, and the default backend as
a user calls it, and compares with the method's fp32 reference on the **last R query rows**:

- forward: the output's last R rows;
- backward: the gradient flowing from the last R rows only (``dout`` zero elsewhere): dq on those rows, and
  dk, dv in full (every key they reach contributes).

The reference for the last R rows is the reference run as cross-attention: R queries against all N keys,
bottom-right aligned (query ``i`` at position ``i + N - R``), which is exactly the self-attention's last R
rows for every position-only mask and dense method (attnlab's alignment convention). Methods whose plan is
estimated from q and k, with tensor inputs, or without a cross pattern are not checked here (their plan for
a row subset would differ): they are listed as skipped with that reason.

Rule: FlashAttention's, as in :func:`attnlab.testing.check_parity`: the error against the fp32 reference at
most ``FWD_FACTOR`` (forward) / ``BWD_FACTOR`` (gradients) times the error of the same reference computed in
the low-precision dtype, plus a small floor.

    python benchmarks/timed_check.py --device cuda --length 65536 \
        --methods softmax,sigmoid,sliding_window,streaming,dilated,block_local --out timed_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.env import environment
from attnlab.patterns import Pattern
from attnlab.testing import BWD_FACTOR, FWD_FACTOR, bound, max_abs


def check_one(
    method: str,
    backend: str | None,
    params: dict[str, Any],
    causal: bool,
    q0: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    rows: int,
) -> dict[str, Any]:
    """Errors (and bounds) of one backend (None: the default choice) against the reference on the last
    ``rows`` query rows, forward and gradients."""
    spec = attnlab.get(method)
    scale = q0.shape[-1] ** -0.5
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))
    kw: dict[str, Any] = dict(params)
    if backend is not None:
        kw["backend"] = backend
    chosen = attnlab.explain(q0, k0, v0, method=method, causal=causal, backend=backend, **params).backend
    out = attnlab.attention(q, k, v, method=method, causal=causal, **kw)
    assert isinstance(out, torch.Tensor)
    g = torch.Generator(device="cpu").manual_seed(1)
    d_rows = torch.randn(out[:, :, -rows:].shape, generator=g).to(out.device, out.dtype)
    dout = torch.zeros_like(out)
    dout[:, :, -rows:] = d_rows
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    got = {"out": out[:, :, -rows:], "dq": dq[:, :, -rows:], "dk": dk, "dv": dv}

    def reference(upcast: bool) -> dict[str, torch.Tensor]:
        qr = q0[:, :, -rows:].detach().clone().requires_grad_(True)
        kr, vr = (t.detach().clone().requires_grad_(True) for t in (k0, v0))
        p = spec.make_params(params)
        o = spec.reference(qr, kr, vr, p, causal=causal, scale=scale, upcast=upcast)
        gq, gk, gv = torch.autograd.grad(o, (qr, kr, vr), d_rows.to(o.dtype))
        return {"out": o, "dq": gq, "dk": gk, "dv": gv}

    ref, low = reference(True), reference(False)
    errors = {}
    for name in got:
        factor = FWD_FACTOR if name == "out" else BWD_FACTOR
        err = max_abs(got[name], ref[name]) if torch.isfinite(got[name]).all() else float("nan")
        errors[name] = {
            "err": err,
            "bound": bound(max_abs(low[name], ref[name]), ref[name], factor, q0.dtype),
        }
    passed = all(e["err"] <= e["bound"] for e in errors.values())
    return {"method": method, "backend": backend or "default", "ran": getattr(chosen, "name", None),
            "params": params, "causal": causal, "rows": rows, "errors": errors, "passed": passed}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=64, help="query rows checked (the last ones)")
    ap.add_argument("--methods", default="softmax,sigmoid,sliding_window,streaming,dilated,block_local")
    ap.add_argument("--out", type=Path, default=Path("timed_check.json"))
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    n, h, d = args.length, args.heads, args.head_dim
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
    results: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        spec = attnlab.get(method)
        params = dict(spec.bench_params(n)[0])
        why = (
            "plan estimated from q and k" if spec.estimate is not None
            else "tensor inputs" if spec.inputs
            else "no cross pattern" if Pattern.CAUSAL_CROSS not in spec.patterns
            else ""
        )  # fmt: skip
        for causal in (True, False):
            if why:
                results.append({"method": method, "causal": causal, "skipped": why})
                continue
            for backend in (None, *(b.name for b in spec.backends)):
                t0 = time.perf_counter()
                try:
                    r = check_one(method, backend, params, causal, q0, k0, v0, args.rows)
                except attnlab.BackendError as e:  # refused (e.g. the N x N eager path): recorded
                    r = {"method": method, "backend": backend, "causal": causal, "skipped": str(e)[:300]}
                except Exception as e:  # a crash is a failed check
                    r = {"method": method, "backend": backend, "causal": causal, "passed": False,
                         "crash": f"{type(e).__name__}: {e}"[:500]}  # fmt: skip
                r["seconds"] = round(time.perf_counter() - t0, 2)
                results.append(r)
                status = "skipped" if "skipped" in r else "PASS" if r.get("passed") else "FAIL"
                print(method, backend or "default", "causal" if causal else "noncausal", status,
                      {k: f"{e['err']:.2e}/{e['bound']:.2e}" for k, e in r.get("errors", {}).items()})  # fmt: skip
                torch.cuda.empty_cache() if dev.type == "cuda" else None
    checked = [r for r in results if "skipped" not in r]
    summary = {"checked": len(checked), "passed": sum(bool(r.get("passed")) for r in checked),
               "skipped": len(results) - len(checked)}  # fmt: skip
    shape = {"batch": 1, "heads": h, "kv_heads": h, "n": n, "head_dim": d, "dtype": args.dtype}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": environment(dev), "shape": shape, "summary": summary,
                                    "results": results}, indent=1, default=str))  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
