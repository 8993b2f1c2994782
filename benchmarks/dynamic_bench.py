"""The dynamic sparse prefill methods as a user calls them, against cuDNN dense (issue 8's 128K target).

    PYTHONPATH=$PWD python benchmarks/dynamic_bench.py --out DIR [--quick] [--budget-s 420]

Per length (32K, 64K; then 128K for the three fastest at 64K while the wall budget lasts), causal,
B=1 H=32 H_kv=8 D=128 bf16, random inputs, every registered dynamic method with its defaults (except
where a default plan cannot be built at these lengths: the ``SUBSTITUTE`` table says which and why):

1. one call ``attnlab.attention(q, k, v, method=m, causal=True, return_plan=True)`` (compiles, tunes);
2. check: the fast path given that call's plan (``block_sparse_attention`` over the plan's tables; for
   ``nsa`` its three branches given the selected branch's plan) on the last ``CHECK_ROWS`` queries
   against the fp32 reference over the same plan, with FlashAttention's rule (at most 2x the error of
   the same math in bf16, plus the bf16 rounding floor; :func:`attnlab.testing.bound`);
3. timing in rotating rounds with CUDA events (``measure_interleaved``, >= 10 calls each, quartiles
   kept): cuDNN SDPA dense, the method as called, its estimator alone (q, k -> plan), and the estimator
   plus the executor's tables. A method whose single call takes over ``SLOW_S`` is timed by 3 plain
   calls instead (recorded as such).

Writes DIR/dynamic.json after every point. Recall is not measured here (random inputs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.backends.block_sparse import CPU_TILE, TILE
from attnlab.bench.timing import measure_interleaved
from attnlab.kernels.block_sparse.op import block_sparse_attention
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.plans import Plan
from attnlab.plans.executor import executor_tables
from attnlab.reference import masked_softmax_attention
from attnlab.testing import FWD_FACTOR, bound

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run (interpreted)
CHECK_ROWS = 64
SLOW_S = 3.0
#: in the order they run (cheap estimators first, so a spent budget loses the slow ones)
METHODS = ("block_topk", "nsa", "flexprefill", "vertical_slash", "hip", "dhsa", "bilevel_routing", "indexer_topk",
           "token_sparse")  # fmt: skip
#: defaults whose plans cannot be built at 32K+ in this run's time, and what runs instead
SUBSTITUTE: dict[str, tuple[dict[str, Any], str]] = {
    "indexer_topk": (
        {"granularity": "block", "block": 128},
        "default granularity='token' gives per-row tile patterns: executor tables took 201 s at 8K, H=8 on "
        "the CPU; timed with whole tiles (same topk=2048 token budget)",
    ),
}
#: methods not timed, and why
SKIP = {
    "token_sparse": "every plan it makes has per-token partial tiles (tens of thousands of distinct tile "
    "patterns): executor tables took 5-16 s at 8K, H=8 on the CPU, far beyond this run at 32K, H=32",
}


def smi() -> str:
    if DEV.type != "cuda":
        return ""
    cmd = ["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem", "--format=csv"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def rows_mask(plan: Plan, r0: int, r1: int) -> torch.Tensor:
    """The plan's token mask for query rows [r0, r1): bool (Bp, Hp, r1 - r0, N_k)."""
    bp, hp = plan.shape[:2]
    rows = torch.arange(r0, r1, device=plan.full.device)
    cols = torch.arange(plan.n_k, device=plan.full.device)
    full = plan.full[:, :, rows // plan.block_q][:, :, :, cols // plan.block_k]
    part = plan.partial[:, :, rows // plan.block_q][:, :, :, cols // plan.block_k]
    if plan.mask_mod is not None:
        b = torch.arange(bp, device=DEV, dtype=torch.int32)[:, None, None, None]
        h = torch.arange(hp, device=DEV, dtype=torch.int32)[None, :, None, None]
        part = part & plan.mask_mod(b, h, rows.int()[None, None, :, None], cols.int()[None, None, None, :])
    mask = full | part
    if plan.columns is not None:
        hit = torch.zeros_like(mask)
        cols_tok = plan.columns[:, :, rows // plan.block_q].long()
        hit.scatter_(-1, cols_tok.clamp_min(0), cols_tok >= 0)
        hit &= ~(plan.full | plan.partial)[:, :, rows // plan.block_q][:, :, :, cols // plan.block_k]
        if plan.causal:
            hit &= cols[None, :] <= (rows + plan.n_k - plan.n_q)[:, None]
        mask = mask | hit
    return mask


def estimator(method: str):  # type: ignore[no-untyped-def]
    if method == "nsa":
        from attnlab.catalog.dynamic.nsa import estimate_selection

        return estimate_selection
    return attnlab.get(method).estimate


def given_plan(method: str, q, k, v, params, plan: Plan) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The fast path's output given ``plan``."""
    scale = q.shape[-1] ** -0.5
    if method != "nsa":
        return block_sparse_attention(q, k, v, executor_tables(plan).as_args(), scale, True)[0]
    from attnlab.catalog.dynamic.nsa import combine, scan
    from attnlab.plans import static_plan

    o_cmp, _ = scan(q, k, v, params, scale=scale)
    assert o_cmp is not None
    sw = attnlab.get("sliding_window")
    if params.window == 0:
        return combine(q, k, v, o_cmp, plan, None, scale, {})
    tile = TILE if DEV.type == "cuda" else CPU_TILE  # as the nsa backend
    win = static_plan(sw, sw.make_params({"window": params.window}), q.shape[2], k.shape[2], True, DEV, tile)
    return combine(q, k, v, o_cmp, plan, executor_tables(win).as_args(), scale, {})


def check(method: str, q, k, v, params, plan: Plan, as_called: torch.Tensor) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    scale = q.shape[-1] ** -0.5
    n = q.shape[2]
    r0 = n - CHECK_ROWS
    out = given_plan(method, q, k, v, params, plan)
    mask = rows_mask(plan, r0, n)
    qr = q[:, :, r0:]
    if method == "nsa":
        from attnlab.catalog.dynamic.nsa import reference_given

        ref = reference_given(qr, k, v, params, mask, scale=scale, upcast=True)
        low = reference_given(qr, k, v, params, mask, scale=scale, upcast=False)
    else:
        ref = masked_softmax_attention(qr, k, v, scale=scale, mask=mask, upcast=True)
        low = masked_softmax_attention(qr, k, v, scale=scale, mask=mask, upcast=False)
    ref = ref.float()
    err = (out[:, :, r0:].float() - ref).abs().max().item()
    err_low = (low.float() - ref).abs().max().item()
    allowed = bound(err_low, ref, FWD_FACTOR, q.dtype)
    return {
        "rows": CHECK_ROWS,
        "err": err,
        "err_bf16_reference": err_low,
        "allowed": allowed,
        "passed": err <= allowed,
        "as_called_vs_given_plan": (as_called[:, :, r0:].float() - out[:, :, r0:].float()).abs().max().item(),
    }


def stats(t: Any) -> dict[str, Any]:
    return {"median_ms": t.median_ms, "min_ms": t.min_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "reps": t.reps}


def point(method: str, n: int, quick: bool) -> dict[str, Any]:
    spec = attnlab.get(method)
    kwargs, why = SUBSTITUTE.get(method, ({}, ""))
    params = spec.make_params(kwargs)
    row: dict[str, Any] = {"method": method, "n": n, "b": 1, "h": 32, "h_kv": 8, "d": 128,
                           "params": params.as_dict()}  # fmt: skip
    if why:
        row["not_default"] = why
    h, hk, d = (4, 2, 64) if quick else (32, 8, 128)
    row.update(h=h, h_kv=hk, d=d)
    torch.manual_seed(n)
    q = torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, n, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    scale = d**-0.5
    call = {"method": method, "causal": True, **kwargs}
    t0 = time.perf_counter()
    res = attnlab.attention(q, k, v, return_plan=True, **call)
    sync()
    row["first_call_s"] = time.perf_counter() - t0
    est = estimator(method)
    plan = res.plan
    if plan is None:  # a backend without a plan ran (e.g. on a CPU): check the estimator's plan
        row["as_called_backend_has_no_plan"] = True
        plan = est(q, k, params, causal=True, scale=scale)
    row["block_density"] = plan.block_density
    row["check"] = check(method, q, k, v, params, plan, res.out)
    del res, plan
    t0 = time.perf_counter()
    attnlab.attention(q, k, v, **call)
    sync()
    row["second_call_s"] = time.perf_counter() - t0
    fns = {
        "cudnn_dense": lambda: sdpa_dense(q, k, v, causal=True, scale=scale),
        "as_called": lambda: attnlab.attention(q, k, v, **call),
        "estimate": lambda: est(q, k, params, causal=True, scale=scale),
        "estimate_and_tables": lambda: executor_tables(est(q, k, params, causal=True, scale=scale)),
    }
    if row["second_call_s"] > SLOW_S:
        row["timing"] = "3 plain calls each (a call took over SLOW_S)"
        times: dict[str, list[float]] = {}
        for name, fn in fns.items():
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                sync()
                times.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))
        row["fwd"] = {
            name: {"median_ms": sorted(ts)[1], "min_ms": min(ts), "reps": 3} for name, ts in times.items()
        }
    else:
        res_t = measure_interleaved(fns, DEV, warmup=2, target_s=0.3, min_reps=10, max_reps=30)
        row["fwd"] = {name: stats(t) for name, t in res_t.items()}
    f = row["fwd"]
    dense, called = f["cudnn_dense"]["median_ms"], f["as_called"]["median_ms"]
    row["speedup_vs_cudnn"] = dense / called
    row["estimate_share"] = f["estimate"]["median_ms"] / called
    row["estimate_and_tables_share"] = f["estimate_and_tables"]["median_ms"] / called
    return row


def table(doc: dict[str, Any]) -> str:
    """Markdown rows of a dynamic.json: speed, estimation shares, the check, per (method, N)."""
    lines = [
        "| method | N | block density | as called ms | cuDNN ms | speedup (x cuDNN) | estimate share | "
        "estimate+tables share | check err / allowed | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['n']} | | | | | | | | error: {r['error'].strip().splitlines()[-1][:120]} |"
            )
            continue
        f, c = r["fwd"], r["check"]
        spread = (
            f"{f['as_called']['q1_ms']:.1f}-{f['as_called']['q3_ms']:.1f}"
            if "q1_ms" in f["as_called"]
            else "3 calls"
        )
        note = "not defaults (see JSON)" if "not_default" in r else ""
        lines.append(
            f"| {r['method']} | {r['n']} | {r['block_density']:.3f} | {f['as_called']['median_ms']:.1f} ({spread}) | "
            f"{f['cudnn_dense']['median_ms']:.1f} | {r['speedup_vs_cudnn']:.2f} | {r['estimate_share']:.0%} | "
            f"{r['estimate_and_tables_share']:.0%} | {c['err']:.1e} / {c['allowed']:.1e} "
            f"{'pass' if c['passed'] else 'FAIL'} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", help="print the markdown table of this dynamic.json and exit")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall seconds after which no point starts")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lengths", default="32768,65536", help="comma-separated N (the GPU run)")
    ap.add_argument("--best", type=int, default=3, help="methods rerun at twice the last length")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.out:
        ap.error("--out DIR is required (or --table FILE)")
    start = time.perf_counter()
    attnlab.settings.autotune = True
    attnlab.settings.max_dense_elements = 1 << 31
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import os

    doc: dict[str, Any] = {
        "commit": os.environ.get("ATTNLAB_COMMIT", "unknown"),
        "device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "nvidia_smi": smi(),
        "skipped": SKIP,
        "rows": [],
    }
    methods = [m for m in args.methods.split(",") if m]
    lengths = tuple(int(x) for x in args.lengths.split(","))
    if args.quick:
        lengths = (256, 512) if DEV.type == "cpu" else (2048, 4096)
    for n in lengths:
        for m in methods:
            if m in SKIP:
                continue
            if time.perf_counter() - start > args.budget_s:
                doc["rows"].append({"method": m, "n": n, "error": "not run: wall budget spent"})
                continue
            try:
                row = point(m, n, args.quick)
            except Exception:
                row = {"method": m, "n": n, "error": traceback.format_exc()[-2500:]}
            row["elapsed_s"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            doc["rows"].append(row)
            (out / "dynamic.json").write_text(json.dumps(doc, indent=1))
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    last = [
        r for r in doc["rows"] if r["n"] == lengths[-1] and "speedup_vs_cudnn" in r and r["check"]["passed"]
    ]
    best = sorted(last, key=lambda r: -r["speedup_vs_cudnn"])[: args.best]
    for r in best:
        n = lengths[-1] * 2
        if time.perf_counter() - start > args.budget_s:
            doc["rows"].append({"method": r["method"], "n": n, "error": "not run: wall budget spent"})
            continue
        try:
            row = point(r["method"], n, args.quick)
        except Exception:
            row = {"method": r["method"], "n": n, "error": traceback.format_exc()[-2500:]}
        row["elapsed_s"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)
        doc["rows"].append(row)
        (out / "dynamic.json").write_text(json.dumps(doc, indent=1))
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    print("done", time.perf_counter() - start)


if __name__ == "__main__":
    main()
