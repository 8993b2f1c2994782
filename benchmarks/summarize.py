"""Write benchmarks/results/SUMMARY.md from the committed H100 results (no number is typed by hand).

python benchmarks/summarize.py benchmarks/results/h100-2026-11-22 [--readme README.md]

Every ``results.duckdb`` under the folder is read (read-only; files written by older versions lack newer
columns, whose cells stay empty), all runs. Where several runs measured the same row (method, backend,
parameters, pattern, dtype, batch, heads, kv heads, head dim, lengths, mode), the latest run's row stands.
A table whose rows all come from one run names that run and its commit above it; otherwise every cell
carries a tag ``[a]``, ``[b]``, ... and the table's legend names each tag's run, commit and timing method.
With ``--readme`` the README's generated block (between its h100-table markers) is rewritten too. Blocks of
other generators in SUMMARY.md (between ``<!-- name:begin -->`` / ``<!-- name:end -->`` markers) are kept.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import attnlab
from attnlab.bench.compare import agreement_table, load_text
from attnlab.bench.fidelity import has_recall
from attnlab.bench.sources import SHAPE, Sources, merged, unpacked_db

Row = dict[str, Any]


def met(value: float, target: float) -> str:
    return f"{value:.2f} ({'met' if value >= target else 'NOT met'})"


def _speedup(r: Row | None) -> float | None:
    return None if r is None or r.get("unstable") else r.get("speedup")


def sigmoid_section(root: Path) -> list[str]:
    """Every ``sigmoid_kernel_<commit>.json`` run, point by point, beside the bench harness's own rows."""
    runs = [(p, json.loads(p.read_text())) for p in sorted(root.glob("sigmoid_kernel_*.json"))]
    if not runs:
        return []
    bench, _ = merged(root, "efficiency")
    harness = {
        (r["method"], r["backend"], r["n_k"], r["pattern"] == "causal_self", r["mode"]): r
        for r in bench
        if r["status"] == "ok" and r.get("speedup") and r["backend"] in ("triton", "sdpa")
    }
    used = [r for r in harness.values() if r["method"] in ("sigmoid", "softmax")]
    src = Sources(used)
    names = [p.stem.removeprefix("sigmoid_kernel_") for p, _ in runs]
    lines = [
        "## FlashSigmoid Triton kernel vs cuDNN SDPA softmax (bf16, B=1, H=32, D=128)",
        "",
        "Ratio = t(cuDNN softmax) / t(ours) in the same run: the share of cuDNN's time-rate the kernel reaches. "
        "Targets: forward >= 0.9, backward >= 0.7. Columns `run <commit>`: `benchmarks/sigmoid_kernel.py` "
        "(`sigmoid_kernel_<commit>.json`), which times cuDNN, the kernel and FlexAttention's sigmoid form in "
        "interleaved rounds; its backward ratio compares the backward kernels alone with cuDNN's (fwd+bwd) "
        "minus fwd, **a difference of two medians, not a timed measurement** (it flatters ours by up to 0.12); "
        "the `fwd+bwd, bench` column is timed directly for both sides. Columns `bench`: `attnlab bench` "
        "speedups over cuDNN; `control` is `softmax` through attnlab's `sdpa` backend against the same "
        f"baseline. {src.legend()}",
        "",
        "| N | causal | "
        + " | ".join(f"fwd, run {n}" for n in names)
        + " | fwd, bench | control fwd, bench | "
        + " | ".join(f"bwd (subtracted), run {n}" for n in names)
        + " | fwd+bwd, bench | control fwd+bwd, bench | ours fwd TFLOP/s | Flex sigmoid fwd / ours |",
        "|---|---|" + "---|" * (2 * len(names) + 6),
    ]

    def cell(method: str, backend: str, n: int, causal: bool, mode: str, target: float | None) -> str:
        r = harness.get((method, backend, n, causal, mode))
        if r is None:
            return "—"
        value = _speedup(r)
        if value is None:
            return "unstable" + src.tag(r)
        return (met(value, target) if target else f"{value:.2f}") + src.tag(r)

    points = sorted({(r["n"], r["causal"]) for _, data in runs for r in data["speed"] if "n" in r})
    for n, causal in points:
        rows = [
            next((r for r in data["speed"] if r.get("n") == n and r.get("causal") == causal), None)
            for _, data in runs
        ]
        last = [r for r in rows if r][-1]  # the latest run that measured this point
        cells = [
            *[met(r["fwd_ratio_vs_cudnn"], 0.9) if r else "—" for r in rows],
            cell("sigmoid", "triton", n, causal, "fwd", 0.9),
            cell("softmax", "sdpa", n, causal, "fwd", None),
            *[met(r["bwd_ratio_vs_cudnn"], 0.7) if r else "—" for r in rows],
            cell("sigmoid", "triton", n, causal, "fwd_bwd", None),
            cell("softmax", "sdpa", n, causal, "fwd_bwd", None),
            f"{last['triton_sigmoid_fwd_tflops']:.0f}",
            f"{last['flex_sigmoid_fwd_ms'] / last['triton_sigmoid_fwd_ms']:.1f}x",
        ]
        lines.append(f"| {n} | {causal} | " + " | ".join(cells) + " |")
    checks = runs[-1][1].get("correctness", [])
    passed = sum(c["passed"] for c in checks)
    lines += [
        "",
        f"Correctness at scale on the H100 (run {names[-1]}; accuracy rule vs the fp32 reference, forward and all "
        f"gradients, N=4096 and 1024x4096, MHA and GQA 4:1, causal and not): {passed}/{len(checks)} passed.",
        "",
    ]
    return lines


def _eff_cell(r: Row | None, src: Sources) -> str:
    if r is None or r.get("speedup") is None:
        return "—"
    if r.get("unstable"):
        return "unstable" + src.tag(r)
    if r["density"] < 1:
        return (
            f"{r['speedup']:.2f}x / {r['speedup'] * r['density']:.2f} "
            f"(d={r['density']:.3f}, bd={r['block_density']:.3f})" + src.tag(r)
        )
    return f"{r['speedup']:.2f}x" + src.tag(r)


def _shapes(rows: list[Row]) -> list[tuple]:
    return sorted({tuple(r.get(c) for c in SHAPE) for r in rows}, key=str)


def _shape_text(shape: tuple) -> str:
    dtype, batch, heads, kv_heads, head_dim = shape
    return f"{dtype}, B={batch}, H={heads}, H_kv={kv_heads}, D={head_dim}"


def efficiency_section(root: Path, mode: str) -> list[str]:
    rows, _ = merged(root, "efficiency")
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == mode]
    if not ok:
        return []
    lines = [f"## Benchmark, {mode}: speedup over cuDNN SDPA and ratio to the ideal 1/density", ""]
    for shape in _shapes(ok):
        lines += _efficiency_tables(root, [r for r in ok if tuple(r.get(c) for c in SHAPE) == shape], shape)
    return lines


def _efficiency_tables(root: Path, ok: list[Row], shape: tuple) -> list[str]:
    run_ids = {r["_run"]["run_id"] for r in ok}
    checks, _ = merged(root, "checks", ("method", "backend", "params", "pattern", "dtype", "grad"))
    checks = [c for c in checks if c["_run"]["run_id"] in run_ids]
    lines = [
        f"Shape: {_shape_text(shape)}. Before timing, each backend passed a parity check on this GPU: "
        f"{sum(bool(c['passed']) for c in checks)}/{len(checks)}.",
        "",
        "Cells: speedup over cuDNN SDPA in the same run (x) / speedup x d = the share of the ideal 1/d reached "
        "(d: token density, bd: share of 128x128 tiles computed). A method's budgets scale with N "
        "(`bench_params(n)`); the budget column gives the parameters at the longest N. Dense rows: speedup only. "
        "`softmax`/`sdpa` is the control (the baseline's math through attnlab).",
        "",
    ]
    for pattern in ("causal_self", "noncausal_self"):
        sel = [r for r in ok if r["pattern"] == pattern]
        if not sel:
            continue
        src = Sources(sel)
        lengths = sorted({r["n_k"] for r in sel})
        # a method's budgets scale with N (bench_params(n)); rank them by density at each N
        table: dict[tuple[str, str, int], dict[int, Row]] = defaultdict(dict)
        groups: dict[tuple[str, str, int], list[Row]] = defaultdict(list)
        for r in sel:
            groups[(r["method"], r["backend"], r["n_k"])].append(r)
        for (method, backend, n), rs in groups.items():
            for rank, r in enumerate(sorted(rs, key=lambda r: r["density"])):
                table[(method, backend, rank)][n] = r
        lines += [
            f"### {pattern}",
            "",
            src.legend(),
            "",
            "| method | budget | backend | " + " | ".join(f"N={n // 1024}K" for n in lengths) + " |",
            "|---|---|---|" + "---|" * len(lengths),
        ]
        if ("softmax", "sdpa", 0) not in table:
            lines.append("| softmax | control | sdpa | " + " | ".join("not measured" for _ in lengths) + " |")
        for key in sorted(table, key=lambda k: (k[0] != "softmax", k[0], k[2], k[1])):
            longest = table[key][max(table[key])]
            budget = longest["params"] if longest["params"] != "{}" else "dense"
            cells = [_eff_cell(table[key].get(n), src) for n in lengths]
            at = f"{max(table[key]) // 1024}K"
            lines.append(f"| {key[0]} | `{budget}` at {at} | {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    compiles: dict[int, int] = defaultdict(int)
    for r in ok:
        if r["backend"] == "flex":
            compiles[r["n_k"]] += r.get("compiles") or 0
    lines += [
        "Recompilation (FlexAttention compiled with dynamic shapes; new graphs per length, summed over flex rows): "
        + ", ".join(f"{n // 1024}K: {c}" for n, c in sorted(compiles.items()))
        + ".",
        "",
    ]
    return lines


def _recall(method: str, rs: list[Row]) -> tuple[str, str]:
    """(mean, worst head) of the mass recall; n/a for methods without a plan (older rows stored 1.0)."""
    try:
        defined = has_recall(attnlab.get(method))
    except attnlab.UnknownMethodError:
        defined = True
    rec = [r["mass_recall"] for r in rs if r.get("mass_recall") is not None]
    if not defined or not rec:
        return "n/a", "n/a"
    return f"{sum(rec) / len(rec):.3f}", f"{min(rec):.3f}"


def fidelity_section(root: Path, where: str) -> list[str]:
    """Fidelity rows (latest per key over every database under ``root``), averaged over layers and heads."""
    rows, _ = merged(root, "fidelity", ("workload", "layer", "head", "method", "params", "pattern", "n"))
    if not rows:
        return []
    src = Sources(rows, timing=False)
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["pattern"], r["method"], r["params"], r["n"])].append(r)
    lines = [
        f"## Fidelity to dense softmax, {where} (a measurement, not a test)",
        "",
        f"{src.legend()} `minilm` = Q/K/V of all six layers x 12 heads of the pretrained all-MiniLM-L6-v2 "
        "encoder on 2 x 512 tokens (bidirectional: in runs before the `organism` workload its causal rows "
        "applied a causal mask to an encoder's Q/K; since then it gives non-causal rows only); `organism` = Q/K/V "
        "of the six layers x 5 heads (1 KV head, repeated) of attnlab's small organism, a causal LM, for causal "
        "rows; `random` = Gaussian Q/K/V. Recall = share of the dense attention mass on the computed pairs (mean over "
        "heads / worst head; n/a for methods that compute no subset of softmax attention); error vs uniform = "
        "||O - O_dense|| / ||O_uniform - O_dense|| with O_uniform the mean of V over the allowed keys (0: exact, "
        "1: no better than averaging V; comparable across workloads); rel. error = ||O - O_dense|| / ||O_dense||. "
        "Means over layers and heads; N: the length the budgets were chosen for (`bench_params(N)`).",
        "",
        "| workload | pattern | method | params | N | density | recall (mean) | recall (min head) "
        "| error vs uniform | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workload, pattern, method, params, n), rs in sorted(groups.items()):
        mean = {c: sum(r[c] for r in rs) / len(rs) for c in ("density", "out_rel_err")}
        unif = [r["out_err_vs_uniform"] for r in rs if r.get("out_err_vs_uniform") is not None]
        rec_mean, rec_min = _recall(method, rs)
        lines.append(
            f"| {workload}{src.tag(*rs)} | {pattern} | {method} | `{params}` | {n} | {mean['density']:.3f} | "
            f"{rec_mean} | {rec_min} | {f'{sum(unif) / len(unif):.3f}' if unif else '—'} | "
            f"{mean['out_rel_err']:.3f} |"
        )
    return [*lines, ""]


README_BEGIN = "<!-- h100-table:begin (generated by benchmarks/summarize.py; do not edit) -->"
README_END = "<!-- h100-table:end -->"
HEADLINE_COLUMNS = (
    ("causal_self", "fwd"),
    ("causal_self", "fwd_bwd"),
    ("noncausal_self", "fwd"),
    ("noncausal_self", "fwd_bwd"),
)


def headline(root: Path) -> list[str]:
    """At the longest length: each method's speedup over cuDNN SDPA (fwd, fwd+bwd), causal and not."""
    rows, _ = merged(root, "efficiency")
    ok = [r for r in rows if r["status"] == "ok"]
    n_max = max((r["n_k"] for r in ok), default=0)
    ok = [r for r in ok if r["n_k"] == n_max and not r["backend"].startswith("sdpa:")]
    shape = max(_shapes(ok), key=lambda s: sum(tuple(r.get(c) for c in SHAPE) == s for r in ok), default=None)
    cols: dict[tuple[str, str], dict[tuple[str, str], Row]] = defaultdict(dict)
    for r in ok:
        if tuple(r.get(c) for c in SHAPE) != shape:
            continue
        key = (r["method"], r["backend"])
        best = cols[key].get((r["pattern"], r["mode"]))
        if best is None or r["density"] < best["density"]:  # the sparsest budget
            cols[key][(r["pattern"], r["mode"])] = r
    used = [r for c in cols.values() for r in c.values()]
    src = Sources(used)
    env = json.loads(src.runs[-1]["env"]) if src.runs else {}
    lines = [
        f"Speedup over cuDNN SDPA at N={n_max // 1024}K ({env.get('device', '?')}, "
        f"{_shape_text(shape) if shape else '?'}; sparsest benchmarked budget; in brackets: share of the ideal "
        "1/density reached). `softmax`/`sdpa` is the control: the baseline's math through attnlab.",
        "",
        src.legend(),
        "",
        "| method | backend | density | causal fwd | causal fwd+bwd | non-causal fwd | non-causal fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cols, key=lambda k: (k != ("softmax", "sdpa"), k[0] != "sigmoid", k[0], k[1])):
        cells, dens = [], 1.0
        for h in HEADLINE_COLUMNS:
            r = cols[key].get(h)
            if r is None:
                cells.append("—")
                continue
            dens = r["density"]
            if r.get("unstable"):
                cells.append("unstable" + src.tag(r))
                continue
            extra = f" ({r['speedup'] * r['density']:.2f})" if r["density"] < 1 else ""
            cells.append(f"{r['speedup']:.2f}x{extra}" + src.tag(r))
        lines.append(f"| {key[0]} | {key[1]} | {dens:.3f} | " + " | ".join(cells) + " |")
    shares = [
        r["speedup"] * r["density"]
        for by_col in cols.values()
        for r in by_col.values()
        if r is not None and r["density"] < 1 and not r.get("unstable")
    ]
    if shares:
        met = sum(x >= 0.8 for x in shares)
        lines += [
            "",
            f"Share of the ideal 1/density (the block-sparse issue's target: >= 0.8): {met} of {len(shares)} sparse "
            f"cells reach it (range {min(shares):.2f}-{max(shares):.2f}).",
        ]
    return lines


def verify_line(root: Path) -> list[str]:
    """The H100 ``attnlab verify`` result, counted from its JSON lines (an environment line is skipped)."""
    path = root / "verify_cuda.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    env = next((r["environment"] for r in records if "environment" in r), None)
    rows = [r for r in records if "environment" not in r]
    passed = sum(bool(r["passed"]) for r in rows)
    skipped = sum(bool(r["skipped"]) for r in rows)
    failed = len(rows) - passed - skipped
    at = f" at commit `{str(env['commit'])[:7]}`{' (dirty tree)' if env.get('dirty') else ''}" if env else ""
    methods = sorted({str(r["method"]) for r in rows})
    now = len(attnlab.methods())
    lines = [
        "",
        f"`attnlab verify --device cuda` on the H100{at}: {passed} passed, {failed} failed, {skipped} skipped "
        f"(every backend x pattern of the {len(methods)} methods registered then: {', '.join(methods)}; bf16 and "
        f"fp32, forward and gradients; `{root.name}/{path.name}`). The registry now has {now} methods.",
    ]
    later = sorted(root.parent.glob("*/verify/verify_cuda_*.jsonl"))
    if later:
        folder = later[-1].parent
        runs = sorted(folder.glob("verify_cuda_*.jsonl"))
        recs = [json.loads(x) for f in runs for x in f.read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "environment" not in r]
        n_ok = sum(bool(r["passed"]) for r in recs)
        n_skip = sum(bool(r["skipped"]) for r in recs)
        covered = len({str(r["method"]) for r in recs})
        lines.append(
            f"Later GPU verify runs in `{folder.parent.name}/{folder.name}/` ({len(runs)} runs, {covered} methods; "
            f"their NOTES say which commit and what each failure was): {n_ok} passed, "
            f"{len(recs) - n_ok - n_skip} failed, {n_skip} skipped."
        )
    return lines


def update_readme(readme: Path, lines: list[str]) -> None:
    text = readme.read_text()
    if README_BEGIN not in text:
        return
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    block = README_BEGIN + "\n" + "\n".join(lines) + "\n" + README_END
    readme.write_text(text[:start] + block + text[end:])


def summary(root: Path) -> list[str]:
    lines = [
        "# H100 results — measured figures next to their targets",
        "",
        "Generated by `python benchmarks/summarize.py " + str(root) + "` from the committed raw results "
        "(DuckDB databases, JSON exports, logs) in that folder; `attnlab report --db <folder>/results.duckdb` "
        "rebuilds the HTML report of any of these databases with its plots (reports are not committed; a "
        "`results.duckdb.gz` is gunzipped first).",
        "",
    ]
    notes = root / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += [*verify_line(root)[1:], ""]
    lines += sigmoid_section(root)
    for mode in ("fwd", "fwd_bwd"):
        lines += efficiency_section(root, mode)
    lines += fidelity_section(root, "on the H100")
    cpu = latest_cpu_folder(root.parent)
    if cpu is not None:
        lines += fidelity_section(cpu, "on CPU")
    cold_warm = latest_cpu_folder(root.parent, "cold/results.duckdb*")
    if cold_warm is not None:
        lines += cold_warm_section(cold_warm)
    return lines


def latest_cpu_folder(results: Path, holding: str = "**/results.duckdb*") -> Path | None:
    """The newest ``cpu-*`` results folder (names sort by date, then session) with a file matching
    ``holding`` (a glob: by default a bench database anywhere below it)."""
    folders = sorted(p for p in results.glob("cpu-*") if p.is_dir() and any(p.glob(holding)))
    return folders[-1] if folders else None


def cold_warm_section(cpu: Path) -> list[str]:
    """The newest CPU folder's first run on an empty compile cache (``cold/``) against a warm rerun (``warm/``)."""
    cold_db, warm_db = unpacked_db(cpu / "cold"), unpacked_db(cpu / "warm")
    if not (cold_db.exists() and warm_db.exists()):
        return []
    table = agreement_table(cold_db, warm_db)
    if not table:
        return []
    return [
        f"## CPU: the first `attnlab bench` on an empty compile cache vs a warm rerun (`{cpu.name}/`)",
        "",
        "`cold/`: `attnlab bench` with fresh, empty `TORCHINDUCTOR_CACHE_DIR` and `TRITON_CACHE_DIR`; `warm/`: the "
        "same command again with those caches. Ratio = a row's speedup in the cold run / in the warm run "
        f"(1.000: the same). Machine load (1-minute load average) while rows were timed: cold {load_text(cold_db)}, "
        f"warm {load_text(warm_db)}; the benchmark itself runs one thread per core, so a load above the core "
        "count plus one means other processes competed (such rows are marked busy in the reports).",
        "",
        *table,
        "",
        *_warm_again(cpu, warm_db),
        *_more_pairs(cpu),
    ]


def _more_pairs(cpu: Path) -> list[str]:
    """Further cold / warm pairs of the same folder (``<set>-cold/`` against ``<set>-warm/``: the same
    procedure repeated later), each as its own table: every pair measured is shown, not the best."""
    lines: list[str] = []
    for cold in sorted(cpu.glob("*-cold")):
        warm = cold.with_name(cold.name.removesuffix("cold") + "warm")
        table = agreement_table(unpacked_db(cold), unpacked_db(warm)) if warm.is_dir() else []
        if table:
            lines += [
                f"The same procedure on another pair of runs (`{cold.name}/` against `{warm.name}/`; load: cold "
                f"{load_text(unpacked_db(cold))}, warm {load_text(unpacked_db(warm))}).",
                "",
                *table,
                "",
            ]
    return lines


def _warm_again(cpu: Path, warm_db: Path) -> list[str]:
    """A second warm run (``warm2/``) against the first: the benchmark's own run-to-run spread, the
    yardstick for the cold / warm agreement above."""
    warm2 = unpacked_db(cpu / "warm2")
    table = agreement_table(warm2, warm_db) if warm2.exists() else []
    if not table:
        return []
    return [
        "The same command a third time (`warm2/`, caches warm) against `warm/`: how far two warm runs minutes "
        f"apart agree (load: {load_text(warm2)}). Ratio = warm2 / warm.",
        "",
        *table,
        "",
    ]


def session_notes(folder: Path) -> list[str]:
    """Each results folder's ``NOTES.md`` (or ``README.md``) under ``folder`` (one run or a few, by area:
    decode, linear, ...), as sections of the summary: a heading naming the file, then its text with its
    headings two levels down (code blocks left alone)."""
    lines: list[str] = []
    for area in sorted(p for p in folder.iterdir() if p.is_dir()):
        notes = next((area / n for n in ("NOTES.md", "README.md") if (area / n).exists()), None)
        if notes is None:
            continue
        rel = f"{folder.name}/{area.name}"
        lines += [f"## {rel}: measured figures and targets (from `{rel}/{notes.name}`)", ""]
        in_code = False
        for line in notes.read_text().strip().splitlines():
            in_code ^= line.startswith("```")
            lines.append("##" + line if line.startswith("#") and not in_code else line)
        lines.append("")
    return lines


_BLOCK = re.compile(r"<!-- ([\w-]+):begin.*?-->.*?<!-- \1:end -->", re.DOTALL)


def foreign_blocks(text: str) -> list[str]:
    """Blocks between ``<!-- name:begin ... -->`` and ``<!-- name:end -->`` markers that other generators
    (e.g. benchmarks/hotpath_table.py) keep in the file: carried over, after this generator's part."""
    return [line for m in _BLOCK.finditer(text) for line in (m.group(0), "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder of the H100 results")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/SUMMARY.md"))
    parser.add_argument(
        "--readme", type=Path, default=None, help="also rewrite this README's generated block"
    )
    parser.add_argument(
        "--headline",
        type=Path,
        default=None,
        help="with --readme: take the README's headline table from this folder (e.g. one run) instead of root",
    )
    parser.add_argument(
        "--sessions",
        type=Path,
        nargs="*",
        default=[],
        help="later results folders whose per-area NOTES.md are appended (e.g. h100-2026-11-23)",
    )
    args = parser.parse_args()
    kept = foreign_blocks(args.out.read_text()) if args.out.exists() else []
    later = [line for folder in args.sessions for line in session_notes(folder)]
    args.out.write_text("\n".join([*summary(args.root), *kept, *later]).rstrip("\n") + "\n")
    print(f"wrote {args.out}")
    if args.readme:
        update_readme(args.readme, headline(args.headline or args.root) + verify_line(args.root))
        print(f"rewrote the generated block of {args.readme}")


if __name__ == "__main__":
    main()
