"""Correct where it is timed: each (method, budget, backend) of a benchmark run checked at the timed shape.

The benchmark's own pre-timing check runs on a small case (384 tokens) of the run's dtype and head dim; this
script runs the exact configuration a run timed (length, heads, head dim, dtype, the backend's autotuned
long-sequence schedule) through ``attnlab.attention`` with each backend forced, and with the default choice
as a user calls it, and compares with the method's fp32 reference on the **last R query rows**. What is
covered, as the benchmark times it:

- every budget the benchmark times (``spec.bench_params(n)``, all of them, or the first with
  ``--budgets first`` as ``attnlab bench --budgets first`` does);
- both paths: **inference** (``torch.no_grad()``, output only) and **training** (inputs that require grad:
  output and gradients). Dispatch may choose another backend for each (``MethodSpec.training_backends``;
  backends without a backward), so each result records the backend that path ran (``ran``: what
  ``attnlab.explain`` chooses for the very tensors and grad mode of the checked call);
- the method's required tensor inputs drawn as the benchmark draws them
  (:func:`attnlab.bench.calls.required_inputs`); methods whose inputs are all optional (alibi, sink, ...)
  run without them, as the benchmark times them. An input with an ``N_q`` axis is cut to the last R rows
  for the reference.

Per path: forward, the output's last R rows; training also the gradient flowing from the last R rows only
(``dout`` zero elsewhere): dq on those rows, and dk, dv in full (every key they reach contributes).

The reference for the last R rows is the reference run as cross-attention: R queries against all N keys,
bottom-right aligned (query ``i`` at position ``i + N - R``), which is exactly the self-attention's last R
rows for every position-only mask and dense method (attnlab's alignment convention). So a causal row needs
the method's ``causal_cross`` pattern and a non-causal row its ``noncausal_cross`` pattern. Skipped, with
the reason recorded (never counted as passed): methods whose plan is estimated from q and k (the dynamic
family: a row subset would get another plan), stateful methods (decode selection, recurrences: the last
rows depend on the state built by the others), and methods without the self or cross pattern of the row.

Rule: FlashAttention's, as in :func:`attnlab.testing.check_parity`: the error against the fp32 reference at
most ``FWD_FACTOR`` (forward) / ``BWD_FACTOR`` (gradients) times the error of the same reference computed in
the low-precision dtype, plus a small floor.

    python benchmarks/timed_check.py --device cuda --length 65536 \\
        --methods softmax,sigmoid,sliding_window,streaming,dilated,block_local,alibi,sink --out timed_check.json
    python benchmarks/timed_check.py --device cpu --n 512 --heads 2 --head-dim 32 --dtype float32   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.calls import output_of, required_inputs
from attnlab.bench.env import environment
from attnlab.patterns import Pattern, pattern_of
from attnlab.testing import BWD_FACTOR, FWD_FACTOR, bound, max_abs

#: the two paths a check runs: inference (no grad, output only) and training (output and gradients)
PATHS = ("fwd", "fwd_bwd")


def skip_reason(spec: attnlab.MethodSpec, causal: bool) -> str:
    """Why ``spec`` cannot be checked on its last rows for this causality ("" when it can)."""
    if spec.family == "dynamic" or spec.estimate is not None:
        return "plan estimated from q and k (a subset of rows would get another plan)"
    if spec.stateful:
        return "stateful (the last rows depend on the state the other rows or calls build)"
    own = pattern_of(causal, 2, 2)
    cross = Pattern.CAUSAL_CROSS if causal else Pattern.NONCAUSAL_CROSS
    if own not in spec.patterns:
        return f"no {own.value} pattern"
    if cross not in spec.patterns:
        return f"no {cross.value} pattern (the last rows' reference is that cross-attention)"
    return ""


def reference_inputs(
    spec: attnlab.MethodSpec, extra: Mapping[str, torch.Tensor], rows: int
) -> dict[str, torch.Tensor]:
    """The tensor inputs for the reference of the last ``rows`` query rows: an ``N_q`` axis cut to them
    (unless it broadcasts with size 1), every other input as given."""
    out = {}
    for t in spec.inputs:
        if t.name not in extra:
            continue
        x = extra[t.name]
        if "N_q" in t.shape:
            axis = t.shape.index("N_q")
            if x.shape[axis] != 1:
                x = x.narrow(axis, x.shape[axis] - rows, rows)
        out[t.name] = x
    return out


def check_one(
    method: str,
    backend: str | None,
    params: dict[str, Any],
    causal: bool,
    q0: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    rows: int,
    *,
    grad: bool = True,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Errors (and bounds) of one backend (None: the default choice) against the reference on the last
    ``rows`` query rows: with ``grad`` the training path (output and gradients), else the inference path
    under ``torch.no_grad()`` (output). ``inputs``: the method's tensor inputs (default: none).
    ``ran`` is the backend dispatch chose for this very call (tensors and grad mode)."""
    spec = attnlab.get(method)
    scale = q0.shape[-1] ** -0.5
    extra = dict(inputs or {})
    kw: dict[str, Any] = {**params, **extra}
    if backend is not None:
        kw["backend"] = backend
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q0, k0, v0))
    with contextlib.nullcontext() if grad else torch.no_grad():
        chosen = attnlab.explain(q, k, v, method=method, causal=causal, **kw).backend
        out = output_of(attnlab.attention(q, k, v, method=method, causal=causal, **kw))
    g = torch.Generator(device="cpu").manual_seed(1)
    d_rows = torch.randn(out[:, :, -rows:].shape, generator=g).to(out.device, out.dtype)
    got = {"out": out[:, :, -rows:]}
    if grad:
        dout = torch.zeros_like(out)
        dout[:, :, -rows:] = d_rows
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        got.update({"dq": dq[:, :, -rows:], "dk": dk, "dv": dv})
    ref_extra = reference_inputs(spec, extra, rows)

    def reference(upcast: bool) -> dict[str, torch.Tensor]:
        qr = q0[:, :, -rows:].detach().clone().requires_grad_(grad)
        kr, vr = (t.detach().clone().requires_grad_(grad) for t in (k0, v0))
        p = spec.make_params(params)
        o = spec.reference(qr, kr, vr, p, causal=causal, scale=scale, upcast=upcast, **ref_extra)
        if not grad:
            return {"out": o.detach()}
        gq, gk, gv = torch.autograd.grad(o, (qr, kr, vr), d_rows.to(o.dtype))
        return {"out": o.detach(), "dq": gq, "dk": gk, "dv": gv}

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
    return {"method": method, "backend": backend or "default", "path": "fwd_bwd" if grad else "fwd",
            "ran": getattr(chosen, "name", None), "params": params, "causal": causal, "rows": rows,
            "errors": errors, "passed": passed}  # fmt: skip


def check_method(
    method: str,
    causal: bool,
    q0: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    rows: int,
    *,
    budgets: str = "all",
    backends: Sequence[str] | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every check of one method at one causality: each budget the benchmark times (``budgets``: "all" or
    "first"), the default choice and each backend (or those named in ``backends``; "default" names the
    default choice), each path (:data:`PATHS`). A refusal is recorded as skipped, a crash as failed."""
    spec = attnlab.get(method)
    why = skip_reason(spec, causal)
    if why:
        return [{"method": method, "causal": causal, "skipped": why}]
    sets = spec.bench_params(q0.shape[2])
    sets = list({json.dumps(p, sort_keys=True): p for p in sets}.values())  # a budget listed twice: once
    extra = required_inputs(method, q0, k0, v0)  # as the benchmark draws them
    names: list[str | None] = [None, *(b.name for b in spec.backends)]
    if backends is not None:
        names = [b for b in names if (b or "default") in backends]
    results: list[dict[str, Any]] = []
    for params in sets if budgets == "all" else sets[:1]:
        for backend in names:
            for path in PATHS:
                t0 = time.perf_counter()
                base = {"method": method, "backend": backend or "default", "path": path, "params": params,
                        "causal": causal}  # fmt: skip
                try:
                    r = check_one(method, backend, dict(params), causal, q0, k0, v0, rows,
                                  grad=path == "fwd_bwd", inputs=extra)  # fmt: skip
                except attnlab.BackendError as e:  # refused (e.g. no backward, the N x N eager path)
                    r = {**base, "skipped": str(e)[:300]}
                except Exception as e:  # a crash is a failed check
                    r = {**base, "passed": False, "crash": f"{type(e).__name__}: {e}"[:500]}
                r["seconds"] = round(time.perf_counter() - t0, 2)
                results.append(r)
                status = "skipped" if "skipped" in r else "PASS" if r.get("passed") else "FAIL"
                log(method, params, backend or "default", path, "causal" if causal else "noncausal",
                    f"ran={r.get('ran')}", status,
                    {k: f"{e['err']:.2e}/{e['bound']:.2e}" for k, e in r.get("errors", {}).items()})  # fmt: skip
                if q0.is_cuda:
                    torch.cuda.empty_cache()
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    """Counts: checks run, passed, failed, skipped (a skipped check is never counted as passed)."""
    checked = [r for r in results if "skipped" not in r]
    passed = sum(bool(r.get("passed")) for r in checked)
    return {"checked": len(checked), "passed": passed, "failed": len(checked) - passed,
            "skipped": len(results) - len(checked)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--length", "--n", dest="length", type=int, default=65536, help="sequence length (tokens)"
    )
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=64, help="query rows checked (the last ones)")
    ap.add_argument(
        "--methods", default="softmax,sigmoid,sliding_window,streaming,dilated,block_local,alibi,sink"
    )
    ap.add_argument("--budgets", choices=("all", "first"), default="all", help="the bench's budgets checked")
    ap.add_argument("--backends", default=None, help="only these backends (comma-separated; 'default' = "
                    "the default choice); default: the default choice and every backend")  # fmt: skip
    ap.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both")
    ap.add_argument("--out", type=Path, default=Path("timed_check.json"))
    args = ap.parse_args(argv)
    if not 0 < args.rows <= args.length:
        ap.error(f"--rows {args.rows}: expected 1 <= rows <= --length {args.length}")
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    n, h, d = args.length, args.heads, args.head_dim
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
    backends = args.backends.split(",") if args.backends else None
    causals = {"both": (True, False), "causal": (True,), "noncausal": (False,)}[args.causal]
    results: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        for causal in causals:
            results += check_method(
                method, causal, q0, k0, v0, args.rows, budgets=args.budgets, backends=backends
            )
    summary = summarize(results)
    shape = {"batch": 1, "heads": h, "kv_heads": h, "n": n, "head_dim": d, "dtype": args.dtype}
    report = {"env": environment(dev), "shape": shape, "summary": summary, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(summary)
    return report


if __name__ == "__main__":
    main()
