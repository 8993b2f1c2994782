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
the method's ``causal_cross`` pattern and a non-causal row its ``noncausal_cross`` pattern.

Two kinds of method are checked on the whole call instead (a row subset alone would compute another thing):

- **dynamic sparse** (a plan estimated from q and k): the call runs at the timed length with
  ``return_plan=True``; its last R rows are checked against softmax attention restricted to the plan the
  call executed (that plan's token mask on those rows, :func:`plan_rows_mask`), fp32 and low precision.
  This is correctness (the executor computes what its plan says), not fidelity to dense attention (the
  benchmark measures that apart), and top-k ties cannot make it flaky. It holds for a method whose
  reference is softmax over its estimated plan, which is checked first on a small case
  (:func:`plan_reason`); a dynamic method without an estimator (nsa's branches) is skipped.
- **stateful linear** (a recurrence): the whole call from the zero state, its output and final state
  against the method's reference (the token-by-token recurrence) at the timed length; training also the
  gradients from the last R rows. The reference's backward keeps one state per token, so the training
  path is skipped (reason recorded) when that would pass ``--ref-graph-gb``.

Skipped, with the reason recorded (never counted as passed): decode selection methods (stateful over a KV
cache, timed at decode shapes), dynamic methods without an estimator or whose reference is not softmax
over their plan, and methods without the self (or, checked on the last rows, cross) pattern of the row.

Rule: FlashAttention's, as in :func:`attnlab.testing.check_parity`: the error against the fp32 reference at
most ``FWD_FACTOR`` (forward) / ``BWD_FACTOR`` (gradients) times the error of the same reference computed in
the low-precision dtype, plus a small floor; for stateful methods also at most ``STATEFUL_RTOL`` of the
reference's scale (the low-precision recurrence drifts far more than the kernels).

    python benchmarks/timed_check.py --device cuda --length 65536 \\
        --methods softmax,sigmoid,sliding_window,streaming,dilated,block_local,alibi,sink --out timed_check.json
    python benchmarks/timed_check.py --device cuda --length 32768 \\
        --methods block_topk,vertical_slash,flexprefill --out timed_check_dynamic.json
    python benchmarks/timed_check.py --device cuda --length 8192 --causal causal \\
        --methods lightning,gla,gated_delta,linear --out timed_check_linear.json
    python benchmarks/timed_check.py --device cpu --n 512 --heads 2 --head-dim 32 --dtype float32   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.calls import output_of, required_inputs
from attnlab.bench.env import environment
from attnlab.patterns import Pattern, pattern_of
from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention
from attnlab.settings import settings
from attnlab.testing import BWD_FACTOR, FWD_FACTOR, bound, max_abs, state_tensors

#: the two paths a check runs: inference (no grad, output only) and training (output and gradients)
PATHS = ("fwd", "fwd_bwd")
#: Stateful methods: the bound is also at most this share of (1 + max |reference|) (gradients: times
#: BWD_FACTOR / FWD_FACTOR). The low-precision reference runs the recurrence token by token with the state
#: in that dtype, whose drift over thousands of tokens (lightning, linear: 18-51% of max |o| at 8K bf16)
#: would pass a 15% error; the kernels keep the state in fp32 (their errors: under 0.6% of max |ref| on
#: the H100 at 8K bf16, benchmarks/results/h100-2026-11-23-s4/linear). fp32 allows TF32 dots on a GPU.
STATEFUL_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
#: the most memory (GB) the stateful reference's autograd graph may take (one state per token, about
#: three tensors each); above it the training path of a stateful method is skipped
REF_GRAPH_GB = 16.0


class Skip(Exception):
    """A check that cannot run here, with the reason (recorded as skipped, never as passed)."""


def kind_of(spec: attnlab.MethodSpec) -> str:
    """How a method is checked: "planned" (dynamic: its last rows against softmax over the plan the call
    executed), "stateful" (a recurrence: the whole output and the final state) or "rows" (the last rows
    against the reference run as cross-attention)."""
    if spec.estimate is not None:
        return "planned"
    return "stateful" if spec.stateful else "rows"


def skip_reason(spec: attnlab.MethodSpec, causal: bool) -> str:
    """Why ``spec`` cannot be checked at the timed shape for this causality ("" when it can)."""
    if spec.stateful and spec.family == "decode":
        return "decode selection (stateful over a KV cache): timed at decode shapes, not checked here"
    if spec.family == "dynamic" and spec.estimate is None:
        return "dynamic without an estimator (e.g. nsa's gated branches): its output is not softmax over one plan"
    own = pattern_of(causal, 2, 2)
    if own not in spec.patterns:
        return f"no {own.value} pattern"
    if kind_of(spec) != "rows":
        return ""
    cross = Pattern.CAUSAL_CROSS if causal else Pattern.NONCAUSAL_CROSS
    if cross not in spec.patterns:
        return f"no {cross.value} pattern (the last rows' reference is that cross-attention)"
    return ""


@contextlib.contextmanager
def dense_allowed(elements: int) -> Iterator[None]:
    """``settings.max_dense_elements`` raised to at least ``elements`` inside the block (the mask of R
    rows by N keys over every head may pass the default limit at the timed length)."""
    old = settings.max_dense_elements
    settings.max_dense_elements = max(old, elements)
    try:
        yield
    finally:
        settings.max_dense_elements = old


def plan_rows_mask(plan: Plan, rows: int) -> torch.Tensor:
    """The token mask of ``plan``'s last ``rows`` query rows, bool (Bp, Hp, rows, N_k), without the whole
    (N_q, N_k) mask: the plan cut to the query blocks that hold those rows, its ``mask_mod`` shifted to
    their absolute positions (token columns and the causal bound need no shift: both count from the last
    row)."""
    start = (plan.n_q - rows) // plan.block_q
    first = start * plan.block_q
    mod = plan.mask_mod

    def shifted(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        assert mod is not None
        return mod(b, h, q_idx + first, kv_idx)

    cut = Plan(
        plan.n_q - first, plan.n_k, plan.causal, plan.block_q, plan.block_k,
        plan.full[:, :, start:], plan.partial[:, :, start:], None if mod is None else shifted,
        kind=plan.kind, columns=None if plan.columns is None else plan.columns[:, :, start:],
    )  # fmt: skip
    bp, hp = plan.shape[:2]
    with dense_allowed(bp * hp * cut.n_q * plan.n_k):
        return cut.dense_mask()[:, :, -rows:]


def plan_reason(
    spec: attnlab.MethodSpec, params: dict[str, Any], causal: bool, device: torch.device, n: int = 192
) -> str:
    """Empty when the method's reference is softmax attention over its estimated plan (checked on a small
    random fp32 case of ``n`` tokens), else why not: a check against the executed plan would then not be a
    check of the method."""
    from attnlab.bench.planning import estimated_plan

    g = torch.Generator(device="cpu").manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).to(device) for _ in range(3))
    scale = 32**-0.5
    try:
        p = spec.make_params(params)
        plan = estimated_plan(spec, p, q, k, causal, None, scale)
        want = output_of(spec.reference(q, k, v, p, causal=causal, scale=scale))
        got = masked_softmax_attention(q, k, v, scale=scale, mask=plan.dense_mask())
    except Exception as e:  # e.g. a parameter set that does not fit the small case
        return (
            f"could not check that its reference is softmax over its plan at N={n}: {type(e).__name__}: {e}"
        )
    diff = max_abs(want, got)
    if diff > 1e-4:
        return f"its reference is not softmax over its estimated plan (max |diff| {diff:.2e} at N={n})"
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
    ref_graph_gb: float = REF_GRAPH_GB,
) -> dict[str, Any]:
    """Errors (and bounds) of one backend (None: the default choice) against the reference: with ``grad``
    the training path (output and gradients from the last ``rows`` query rows), else the inference path
    under ``torch.no_grad()`` (output). ``inputs``: the method's tensor inputs (default: none). ``ran`` is
    the backend dispatch chose for this very call (tensors and grad mode). What is compared depends on
    :func:`kind_of`: the last rows (rows, planned: against softmax over the plan the call returned), or the
    whole output and final state (stateful). Raises :class:`Skip` for a stateful training path whose
    reference graph would pass ``ref_graph_gb``."""
    spec = attnlab.get(method)
    kind = kind_of(spec)
    scale = q0.shape[-1] ** -0.5
    extra = dict(inputs or {})
    kw: dict[str, Any] = {**params, **extra}
    if backend is not None:
        kw["backend"] = backend
    if kind == "planned":
        kw["return_plan"] = True
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q0, k0, v0))
    with contextlib.nullcontext() if grad else torch.no_grad():
        chosen = attnlab.explain(q, k, v, method=method, causal=causal, **kw).backend
        res = attnlab.attention(q, k, v, method=method, causal=causal, **kw)
    out = output_of(res)
    whole = kind == "stateful"  # the whole output (its rows depend on the state the others built)
    got = {"out": out if whole else out[:, :, -rows:]}
    states = state_tensors(res.state) if whole and isinstance(res, attnlab.Result) else []
    names = ["state"] if len(states) == 1 else [f"state{i}" for i in range(len(states))]
    got.update(zip(names, states, strict=True))
    if whole and grad:
        gb = out.shape[2] * sum(s.numel() for s in states) * 4 * 3 / 1e9
        if gb > ref_graph_gb:
            raise Skip(
                f"training path: the token-by-token reference's backward would keep about {gb:.1f} GB of states "
                f"(> --ref-graph-gb {ref_graph_gb}); the inference path checks output and state"
            )
    g = torch.Generator(device="cpu").manual_seed(1)
    d_rows = torch.randn(out[:, :, -rows:].shape, generator=g).to(out.device, out.dtype)
    dout = torch.zeros_like(out)
    dout[:, :, -rows:] = d_rows
    if grad:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        got.update({"dq": dq if whole else dq[:, :, -rows:], "dk": dk, "dv": dv})
    p = spec.make_params(params)
    mask = None
    if kind == "planned":
        plan = res.plan if isinstance(res, attnlab.Result) else None
        if not isinstance(plan, Plan):
            raise RuntimeError(f"{method}: the call returned no plan with return_plan=True (got {plan!r})")
        mask = plan_rows_mask(plan, rows)
    ref_extra = reference_inputs(spec, extra, rows)

    def reference(upcast: bool) -> dict[str, torch.Tensor]:
        if whole:
            qr, kr, vr = (t.detach().clone().requires_grad_(grad) for t in (q0, k0, v0))
            o, state = spec.reference(qr, kr, vr, p, causal=causal, scale=scale, upcast=upcast, **extra)
            ref_states = state_tensors(state)
            if len(ref_states) != len(states):
                raise RuntimeError(f"{method}: the call's state has {len(states)} tensors, the reference's "
                                   f"{len(ref_states)}")  # fmt: skip
            refs = {"out": o.detach(), **{n: s.detach() for n, s in zip(names, ref_states, strict=True)}}
            d_o = dout
        else:
            qr = q0[:, :, -rows:].detach().clone().requires_grad_(grad)
            kr, vr = (t.detach().clone().requires_grad_(grad) for t in (k0, v0))
            if mask is not None:  # softmax over the plan the call executed, on its last rows
                o = masked_softmax_attention(qr, kr, vr, scale=scale, mask=mask, upcast=upcast)
            else:
                o = spec.reference(qr, kr, vr, p, causal=causal, scale=scale, upcast=upcast, **ref_extra)
            refs, d_o = {"out": o.detach()}, d_rows
        if grad:
            gq, gk, gv = torch.autograd.grad(o, (qr, kr, vr), d_o.to(o.dtype))
            refs.update({"dq": gq, "dk": gk, "dv": gv})
        return refs

    with dense_allowed(q0.shape[0] * q0.shape[1] * rows * k0.shape[2]):
        ref, low = reference(True), reference(False)
    errors = {}
    for name in got:
        factor = FWD_FACTOR if name in ("out", *names) else BWD_FACTOR
        err = max_abs(got[name], ref[name]) if torch.isfinite(got[name]).all() else float("nan")
        limit = bound(max_abs(low[name], ref[name]), ref[name], factor, q0.dtype)
        if whole:  # the low-precision recurrence's own drift is no yardstick: cap it (see STATEFUL_RTOL)
            cap = STATEFUL_RTOL.get(q0.dtype, STATEFUL_RTOL[torch.float32]) * (factor / FWD_FACTOR)
            limit = min(limit, cap * (1.0 + float(ref[name].detach().float().abs().max())))
        errors[name] = {"err": err, "bound": limit}
    passed = all(e["err"] <= e["bound"] for e in errors.values())
    return {"method": method, "backend": backend or "default", "path": "fwd_bwd" if grad else "fwd",
            "ran": getattr(chosen, "name", None), "params": params, "causal": causal, "rows": rows,
            "kind": kind, "errors": errors, "passed": passed}  # fmt: skip


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
    ref_graph_gb: float = REF_GRAPH_GB,
) -> list[dict[str, Any]]:
    """Every check of one method at one causality: each budget the benchmark times (``budgets``: "all" or
    "first"), the default choice and each backend (or those named in ``backends``; "default" names the
    default choice), each path (:data:`PATHS`). A refusal is recorded as skipped, a crash as failed; a
    dynamic method's parameter set whose reference is not softmax over its plan (:func:`plan_reason`) is
    skipped with the reason."""
    spec = attnlab.get(method)
    why = skip_reason(spec, causal)
    if why:
        return [{"method": method, "causal": causal, "skipped": why}]
    sets = spec.distinct_bench_params(q0.shape[2])
    sets = list({json.dumps(p, sort_keys=True): p for p in sets}.values())  # a budget listed twice: once
    extra = required_inputs(method, q0, k0, v0)  # as the benchmark draws them
    names: list[str | None] = [None, *(b.name for b in spec.backends)]
    if backends is not None:
        names = [b for b in names if (b or "default") in backends]
    results: list[dict[str, Any]] = []
    for params in sets if budgets == "all" else sets[:1]:
        why = plan_reason(spec, dict(params), causal, q0.device) if kind_of(spec) == "planned" else ""
        if why:
            results.append({"method": method, "causal": causal, "params": params, "skipped": why})
            log(method, params, "causal" if causal else "noncausal", "skipped:", why)
            continue
        for backend in names:
            for path in PATHS:
                t0 = time.perf_counter()
                base = {"method": method, "backend": backend or "default", "path": path, "params": params,
                        "causal": causal}  # fmt: skip
                try:
                    r = check_one(method, backend, dict(params), causal, q0, k0, v0, rows,
                                  grad=path == "fwd_bwd", inputs=extra, ref_graph_gb=ref_graph_gb)  # fmt: skip
                except (attnlab.BackendError, Skip) as e:  # refused (no backward, the N x N eager path, ...)
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
    ap.add_argument("--ref-graph-gb", type=float, default=REF_GRAPH_GB,
                    help="stateful methods: the most GB the reference's backward may keep (else the training "
                    "path is skipped)")  # fmt: skip
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
    shape = {"batch": 1, "heads": h, "kv_heads": h, "n": n, "head_dim": d, "dtype": args.dtype}
    env = environment(dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = args.methods.split(",")
    report: dict[str, Any] = {}
    for i, method in enumerate(names):
        for causal in causals:
            results += check_method(
                method, causal, q0, k0, v0, args.rows, budgets=args.budgets, backends=backends,
                ref_graph_gb=args.ref_graph_gb,
            )  # fmt: skip
        # written after every method, so a run cut short by a time limit keeps what it checked
        done = names[: i + 1]
        report = {"env": env, "shape": shape, "methods_done": done, "complete": len(done) == len(names),
                  "summary": summarize(results), "results": results}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(report["summary"])
    return report


if __name__ == "__main__":
    main()
