"""The ``attnlab eval`` report: accuracy against density and speed per method, as markdown, HTML and plots.

Per task and length, one figure with two panels (accuracy on the y axis of both):

- against *density*: the share of attention the method computes in the phase it runs (prefill density for
  methods that run in prefill, decode density for decode-only methods; :mod:`attnlab.eval.density`);
- against *measured speedup*: softmax's median model step time over the method's, in the eval itself
  (prefill forward pass for methods that run in prefill, decode step for decode-only methods; the whole
  model through attnlab.hf, so overhead outside attention is included); where a benchmark database is
  given, the attention-only speedup of the benchmark's row for the same method, parameters and length
  is listed in the table next to it (the newest benchmark run on the eval's device that timed it, its
  fastest stable backend; the benchmark's shapes, not the model's, named under the table:
  :func:`bench_speedups`).

Points on the Pareto front of their phase (no other run of that phase is at least as accurate and at
least as cheap, and better in one) are joined by a line. The table "cheapest run that keeps >= 95% of dense accuracy" lists, per task
and length, the qualifying run of lowest density (ties: faster) and the fastest qualifying run; runs that
raised or computed the same function as dense by construction (dense family) are left out of both. Where
dense accuracy is 0 the cell says "not determined (dense accuracy 0)" (every run would qualify).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attnlab.eval.tasks import DENSE, EvalResult

#: the share of dense accuracy a run must keep to count as keeping it
KEEP = 0.95


def _phase(m: Mapping[str, Any]) -> str:
    """The phase whose cost a run changes: ``decode`` for decode-only methods, else ``prefill``."""
    return "decode" if m.get("family") == "decode" else "prefill"


def points(result: EvalResult, methods: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One point per (method run, task, length): accuracy, the density and measured speedup of the
    run's phase, perplexity changes (when ``methods`` rows carry them), error."""
    from attnlab.eval.perplexity import with_ppl_changes

    per = {(m["label"], m["length"]): m for m in (methods or with_ppl_changes(result.methods))}
    dense = {m["length"]: m for m in per.values() if m["method"] == DENSE}
    out = []
    for r in result.rows:
        m = per.get((r["label"], r["length"]), {})
        phase = _phase(m)
        ref = dense.get(r["length"], {})
        ms, ref_ms = m.get(f"{phase}_ms"), ref.get(f"{phase}_ms")
        out.append(
            {
                **{k: r[k] for k in ("method", "label", "task", "length", "samples", "correct", "accuracy")},
                "family": m.get("family"),
                "phase": phase,
                "density": m.get(f"{phase}_density"),
                "ms": ms,
                "speedup": ref_ms / ms if ms and ref_ms else None,
                "prefill_ppl_change": m.get("prefill_ppl_change"),
                "decode_ppl_change": m.get("decode_ppl_change"),
                "error": r.get("error") or m.get("error"),
            }
        )
    return out


def pareto(
    pts: Sequence[Mapping[str, Any]], cost: str, higher_is_cheaper: bool = False
) -> list[Mapping[str, Any]]:
    """The points on the accuracy-vs-``cost`` Pareto front (points missing either value are left out),
    ordered by cost (cheapest first)."""
    sign = -1.0 if higher_is_cheaper else 1.0
    ok = [p for p in pts if not _nan(p.get(cost)) and not _nan(p.get("accuracy"))]
    front = []
    for p in ok:
        c, a = sign * p[cost], p["accuracy"]
        dominated = any(
            sign * q[cost] <= c and q["accuracy"] >= a and (sign * q[cost] < c or q["accuracy"] > a)
            for q in ok
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: sign * p[cost])


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def cheapest(pts: Sequence[Mapping[str, Any]], keep: float = KEEP) -> list[dict[str, Any]]:
    """Per (task, length): dense accuracy, the lowest-density run keeping ``keep`` of it, and the fastest.
    Where dense accuracy is 0 the question has no answer (every run keeps 95% of 0): ``determined`` is
    False and no run is listed (``kept`` 0, ``cheapest`` and ``fastest`` None)."""
    out = []
    keys = list(dict.fromkeys((p["task"], p["length"]) for p in pts))
    for task, n in keys:
        cell = [p for p in pts if p["task"] == task and p["length"] == n]
        dense = next((p for p in cell if p["method"] == DENSE), None)
        if dense is None or _nan(dense["accuracy"]):
            continue
        need = keep * dense["accuracy"]
        # with dense accuracy 0 every run "keeps" 95% of it: nothing is determined, no run is listed
        determined = dense["accuracy"] > 0
        ok = [
            p
            for p in cell
            if determined
            and p["family"] != "dense"
            and not p["error"]
            and not _nan(p["accuracy"])
            and p["accuracy"] >= need
        ]
        by_density = sorted(
            (p for p in ok if not _nan(p["density"])), key=lambda p: (p["density"], -(p["speedup"] or 0.0))
        )
        by_speed = sorted((p for p in ok if not _nan(p["speedup"])), key=lambda p: -p["speedup"])
        out.append(
            {
                "task": task,
                "length": n,
                "dense_accuracy": dense["accuracy"],
                "determined": determined,
                "kept": len(ok),
                "runs": sum(1 for p in cell if p["family"] != "dense"),
                "cheapest": by_density[0] if by_density else None,
                "fastest": by_speed[0] if by_speed else None,
            }
        )
    return out


def _device_kind(env: Mapping[str, Any]) -> str:
    """``cpu`` or ``cuda`` for a benchmark run's environment (older runs lack ``device_type``: their device
    name says it, ``CPU ...`` on a CPU)."""
    kind = env.get("device_type")
    if kind:
        return str(kind)
    return "cpu" if str(env.get("device") or "").upper().startswith("CPU") else "cuda"


def bench_speedups(
    root: str | Path,
    lengths: Iterable[int],
    device: str | None = None,
    device_name: str | None = None,
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Attention-only speedups from the benchmark databases under ``root`` (every ``results.duckdb``):
    (method, params JSON with sorted keys, length) -> the as-called speedup of the causal self-attention
    forward row at that length.

    Which row: only runs on the eval's device (``device``: ``cpu`` or ``cuda``, the run's device type; on
    CUDA also ``device_name``, the GPU's name, when given); without ``device``, only the device of the
    newest run that has such rows (devices are never mixed). Per key, the newest of those runs that timed
    it (one run has one dtype and shape, so the value's shape is that run's), and in it the fastest
    backend among its rows not flagged ``unstable``; where every row of that run is unstable, the entry
    says so (``unstable`` True, ``speedup`` None) rather than falling back to another run. Each entry:
    ``speedup``, ``unstable``, ``backend``, ``device``, ``dtype``, ``batch``, ``heads``, ``kv_heads``,
    ``head_dim``, ``passes`` (timing passes whose per-pass speedups the value is the median of), ``run_id``
    and ``folder`` (where the run's database lies under ``root``)."""
    from attnlab.bench.sources import merged

    want = set(lengths)
    rows, _ = merged(Path(root), "efficiency")
    cand: list[dict[str, Any]] = []
    for r in rows:
        if r.get("pattern") != "causal_self" or r.get("mode") != "fwd" or r.get("speedup") is None:
            continue
        if r.get("status") not in (None, "ok") or r.get("baseline_of_run"):
            continue
        if r.get("n_q") != r.get("n_k") or r.get("n_q") not in want:
            continue
        cand.append(r)
    envs = {id(r): json.loads(r["_run"].get("env") or "{}") for r in cand}
    if device is not None:
        kind = device.split(":")[0]
        cand = [
            r
            for r in cand
            if _device_kind(envs[id(r)]) == kind
            and (kind != "cuda" or not device_name or envs[id(r)].get("device") == device_name)
        ]
    elif cand:
        newest = max(cand, key=lambda r: str(r["_run"]["started"]))
        cand = [r for r in cand if envs[id(r)].get("device") == envs[id(newest)].get("device")]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in cand:
        key = (r["method"], json.dumps(json.loads(r["params"] or "{}"), sort_keys=True), int(r["n_q"]))
        groups.setdefault(key, []).append(r)
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, rs in groups.items():
        run = max((r["_run"] for r in rs), key=lambda run: str(run["started"]))
        mine = [r for r in rs if r["_run"]["run_id"] == run["run_id"]]
        stable = [r for r in mine if not r.get("unstable")]
        best = max(stable or mine, key=lambda r: r["speedup"])
        env = json.loads(run.get("env") or "{}")
        out[key] = {
            **{
                k: best.get(k)
                for k in ("dtype", "batch", "heads", "kv_heads", "head_dim", "status", "passes")
            },
            "speedup": best["speedup"] if stable else None,
            "unstable": not stable,
            "backend": best["backend"] if stable else ", ".join(sorted({r["backend"] for r in mine})),
            "device": env.get("device"),
            "run_id": run["run_id"],
            "folder": run.get("folder"),
        }
    return out


def _bench_source(b: Mapping[str, Any]) -> tuple[Any, ...]:
    """The run and shape a benchmark value comes from (what its tag names)."""
    return (b["run_id"], *(b.get(k) for k in ("dtype", "batch", "heads", "kv_heads", "head_dim")))


def _bench_tags(bench: Mapping[tuple[str, str, int], Mapping[str, Any]]) -> dict[tuple[Any, ...], str]:
    """A tag (``a``, ``b``, ...) per run and shape the values come from, in run order."""
    sources = sorted({_bench_source(b) for b in bench.values()}, key=str)
    return {src: string.ascii_lowercase[i] if i < 26 else f"r{i}" for i, src in enumerate(sources)}


def _bench_cell(b: Mapping[str, Any] | None, tags: Mapping[tuple[Any, ...], str]) -> str:
    if not b:
        return "-"
    tag = f" [{tags[_bench_source(b)]}]" if len(tags) > 1 else ""
    if b.get("unstable"):
        return f"unstable ({b['backend']}){tag}"
    return f"{b['speedup']:.2f}x ({b['backend']}){tag}"


def _bench_legend(
    bench: Mapping[tuple[str, str, int], Mapping[str, Any]],
    tags: Mapping[tuple[Any, ...], str],
    info: Mapping[str, Any],
) -> list[str]:
    """The lines under the table that say what the ``bench attn speedup`` column shows and where each
    value comes from (device, dtype and shape of its run)."""
    where = info.get("device_name") or info.get("device") or "the newest benchmark run's device"
    lines = [
        "",
        "`bench attn speedup`: the attention call alone (`attnlab bench`, causal self-attention forward, as "
        "called) over dense SDPA at the same length, in the benchmark's own shape (not the model's), on "
        f"this eval's device ({where}): the newest benchmark run that timed the method at that length, its "
        "fastest backend among the rows not flagged unstable (`unstable`: every row of that run was). With "
        "one timing pass the value is the baseline's median over the row's median in the same rounds; with "
        "several passes (CPU runs) it is the median over the passes of each pass's ratio.",
    ]
    if not bench:
        lines += [
            "",
            f"No benchmark row of this eval's device ({where}) at its lengths: the column is empty.",
        ]
        return lines
    sources = {_bench_source(b): b for b in bench.values()}
    parts = []
    for src, tag in tags.items():
        b, rid = sources[src], src[0]
        shape = (
            f"{b.get('dtype')}, B={b.get('batch')}, H={b.get('heads')}, H_kv={b.get('kv_heads')}, "
            f"D={b.get('head_dim')}"
        )
        head = f"[{tag}] " if len(tags) > 1 else ""
        parts.append(f"{head}run `{rid}` (`{b.get('folder')}/`) on {b.get('device')}: {shape}")
    lines += ["", ("Benchmark runs (each cell's tag names its run): " if len(tags) > 1 else "Benchmark run: ")
              + "; ".join(parts) + "."]  # fmt: skip
    return lines


def short_label(label: str, keep: int = 3) -> str:
    """``label`` with long tuple values shortened (``(256, 768, ..., 7936; 16 values)``) for tables and plots."""

    def cut(m: re.Match[str]) -> str:
        items = [x.strip() for x in m.group(1).split(",") if x.strip()]
        if len(items) <= keep + 1:
            return m.group(0)
        return f"({', '.join(items[:keep])}, ..., {items[-1]}; {len(items)} values)"

    return re.sub(r"\(([0-9, ]+)\)", cut, label)


def _fmt(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if _nan(x):
        return none
    return format(x, spec)


def _pct(x: Any) -> str:
    return "-" if _nan(x) else f"{100 * x:+.1f}%"


def plot(pts: Sequence[Mapping[str, Any]], task: str, n: int) -> bytes | None:
    """The PNG of one task and length (see the module docstring), or None without points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = [p for p in pts if p["task"] == task and p["length"] == n and not p["error"]]
    if not cell:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    marker = {"prefill": "o", "decode": "s"}
    for ax, cost, cheap_high, xlabel in (
        (axes[0], "density", False, "attention density of the method's phase (lower is cheaper)"),
        (axes[1], "speedup", True, "measured model step speedup vs softmax (prefill or decode step)"),
    ):
        for phase in ("prefill", "decode"):
            ps = [p for p in cell if p["phase"] == phase and not _nan(p.get(cost))]
            if ps:
                ax.scatter(
                    [p[cost] for p in ps],
                    [p["accuracy"] for p in ps],
                    marker=marker[phase],
                    alpha=0.7,
                    label=f"{phase} methods",
                )
        for phase, style in (("prefill", "C0--"), ("decode", "C1--")):
            front = pareto([p for p in cell if p["phase"] == phase], cost, cheap_high)
            if front:
                xs, ys = [p[cost] for p in front], [p["accuracy"] for p in front]
                ax.plot(xs, ys, style, lw=1, label=f"Pareto front ({phase})")
                for p in front:
                    ax.annotate(short_label(p["label"]), (p[cost], p["accuracy"]), fontsize=6, rotation=20)
        if cost == "density":
            ax.invert_xaxis()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{task} at {n} tokens")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def markdown(
    result: EvalResult,
    pts: Sequence[Mapping[str, Any]],
    images: Mapping[tuple[str, int], str],
    bench: Mapping[tuple[str, str, int], Mapping[str, Any]] | None = None,
) -> str:
    """The report as markdown (tables; images by relative path)."""
    info = result.info
    lines = [
        f"# attnlab eval: {info.get('model_name') or info.get('model')}",
        "",
        f"Device {info.get('device_name') or info.get('device')}, torch {info.get('torch')}, transformers "
        f"{info.get('transformers')}, commit {info.get('commit') or 'not recorded'}. {info.get('samples')} samples per "
        f"task and length (exact match, greedy), budgets `{info.get('budgets')}`, held-out perplexity over "
        f"{info.get('perplexity_windows', 0)} windows per length ({info.get('decode_tokens')} teacher-forced decode "
        f"steps each). Haystack corpus {info.get('haystack_corpus')}.",
        "",
    ]
    for key in ("note", "caveat"):
        if info.get(key):
            lines += [f"{key.capitalize()}: {info[key]}", ""]
    if info.get("skipped"):
        lines += [f"Left out by the time limit: {', '.join(info['skipped'])}.", ""]
    lines += ["## Cheapest run keeping >= 95% of dense accuracy", ""]
    lines += [
        "| task@length | dense | kept / runs | lowest density (acc, density) | fastest (acc, speedup) |"
    ]
    lines += ["|---|---|---|---|---|"]
    for c in cheapest(pts):
        ch, fa = c["cheapest"], c["fastest"]
        if not c["determined"]:
            what = "not determined (dense accuracy 0)"
            lines.append(
                f"| {c['task']}@{c['length']} | {c['dense_accuracy']:.2f} | - / {c['runs']} | {what} | {what} |"
            )
            continue
        lines.append(
            f"| {c['task']}@{c['length']} | {c['dense_accuracy']:.2f} | {c['kept']} / {c['runs']} | "
            + (f"{short_label(ch['label'])} ({ch['accuracy']:.2f}, {ch['density']:.3f})" if ch else "none")
            + " | "
            + (f"{short_label(fa['label'])} ({fa['accuracy']:.2f}, {fa['speedup']:.2f}x)" if fa else "none")
            + " |"
        )
    lines += ["", "## Accuracy, density, speed and perplexity per run", ""]
    tl = list(dict.fromkeys((p["task"], p["length"]) for p in pts))
    lengths = list(dict.fromkeys(n for _, n in tl))
    head = ["method (budget)", "phase"]
    for n in lengths:
        head += [f"{t}@{n}" for t, m in tl if m == n]
        head += [f"density@{n}", f"speedup@{n}", f"ppl prefill@{n}", f"ppl decode@{n}"]
        if bench is not None:
            head.append(f"bench attn speedup@{n}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = {(p["label"], p["task"], p["length"]): p for p in pts}
    labels = list(dict.fromkeys(p["label"] for p in pts))
    methods = {(m["label"], m["length"]): m for m in result.methods}
    tags = _bench_tags(bench or {})
    for label in labels:
        any_p = next(p for p in pts if p["label"] == label)
        row = [short_label(label).replace("|", "/"), any_p["phase"]]
        for n in lengths:
            first = None
            for t, m in tl:
                if m != n:
                    continue
                p = per.get((label, t, n))
                first = first or p
                if p is None:
                    row.append("-")
                elif p["error"] and p["samples"]:  # the task finished before the run stopped
                    row.append(f"{p['accuracy']:.2f}*")
                elif p["error"]:
                    row.append("error")
                else:  # (no sample made: NaN, shown as the console shows it)
                    row.append(_fmt(p["accuracy"]))
            row += [
                _fmt(first["density"], ".3f") if first else "-",
                _fmt(first["speedup"], ".2f") + ("x" if first and first["speedup"] else "") if first else "-",
                _pct(first["prefill_ppl_change"]) if first else "-",
                _pct(first["decode_ppl_change"]) if first else "-",
            ]
            if bench is not None:
                m = methods.get((label, n))
                b = None
                if m is not None:
                    b = bench.get((m["method"], json.dumps(m["params"], sort_keys=True, default=list), n))
                row.append(_bench_cell(b, tags))
        lines.append("| " + " | ".join(row) + " |")
    if bench is not None:
        lines += _bench_legend(bench, tags, info)
    errors = [(m["label"], m["length"], m["error"]) for m in result.methods if m.get("error")]
    if errors:
        lines += ["", "## Runs that raised", "", "(`*`: a task that finished before its run stopped.)", ""]
        lines += [
            f"- {short_label(label)} at {n}: `{str(e).splitlines()[0][:300]}`" for label, n, e in errors
        ]
    lines += variant_notes(result.methods)
    lines += ["", "## Pareto plots", ""]
    for (task, n), name in images.items():
        lines += [f"![{task} at {n}]({name})", ""]
    return "\n".join(lines) + "\n"


def variant_notes(methods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines (a section, or none) saying, per dense variant in the run, which backend it ran on
    and what it computed with no tensor inputs given (``function`` of its rows,
    :func:`attnlab.eval.tasks.function_check`): softmax itself (its accuracy checks the code path, not the
    variant) or another function than the one the model learned (its accuracy measures that distance, not
    sparsity)."""
    seen: dict[str, Mapping[str, Any]] = {}
    for m in methods:
        if m.get("function") and m["label"] not in seen:
            seen[m["label"]] = m
    if not seen:
        return []
    lines = [
        "",
        "## What the dense variants computed",
        "",
        "attnlab eval gives no tensor input (gate, temperature, sink logits, alpha/beta): the model never "
        "learned one, so each variant runs at its documented default without it.",
        "",
    ]
    for label, m in seen.items():
        f = m["function"]
        backends = m.get("backends") or {}
        on = f" on `{backends[m['method']]}`" if m["method"] in backends else ""
        absent = f"; not given: {', '.join(f['absent'])}" if f.get("absent") else ""
        if f.get("error"):
            what = f"check failed: `{f['error'][:200]}`"
        elif f.get("same_as_softmax"):
            what = (
                f"the same function as softmax (max |diff| {f['softmax_max_diff']:.1e} on a random check): its "
                "accuracy checks this code path, not the variant"
            )
        else:
            what = (
                f"a different function than softmax (max |diff| {f['softmax_max_diff']:.2f} on a random check): "
                "its accuracy measures how far that function is from what the model learned, not sparsity"
            )
        lines.append(f"- {short_label(label)}{on}{absent}: {what}.")
    return lines


def _html(md: str, title: str) -> str:
    """A minimal HTML page of the markdown report (tables, headings, images, lists)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
           "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"]  # fmt: skip
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f"<p><img src='{html.escape(src.rstrip(')'))}' alt='{html.escape(alt)}'></p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out) + "</body></html>\n"


def write_report(
    result: EvalResult, out: str | Path, bench_root: str | Path | None = None, plots: bool = True
) -> Path:
    """Write ``report.md``, ``report.html`` and one ``pareto-<task>-<length>.png`` per task and length into
    ``out``; returns the markdown's path. ``bench_root``: a folder of benchmark databases whose speedups
    are listed next to the eval's."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    pts = points(result)
    images: dict[tuple[str, int], str] = {}
    if plots:
        for task, n in dict.fromkeys((p["task"], p["length"]) for p in pts):
            png = plot(pts, task, n)
            if png is not None:
                name = f"pareto-{task}-{n}.png"
                (folder / name).write_bytes(png)
                images[(task, n)] = name
    bench = None
    if bench_root:
        info = result.info
        bench = bench_speedups(
            bench_root,
            info.get("lengths") or sorted({m["length"] for m in result.methods}),
            info.get("device"),
            info.get("device_name") if str(info.get("device") or "").startswith("cuda") else None,
        )
    md = markdown(result, pts, images, bench)
    path = folder / "report.md"
    path.write_text(md)
    (folder / "report.html").write_text(_html(md, f"attnlab eval: {result.info.get('model_name')}"))
    return path


def card_table(results: Sequence[tuple[str, EvalResult]], length: int) -> str:
    """The model card's table of ``attnlab eval`` runs at ``length``: one row per method run (``softmax``
    from the first result only), with the density of its phase, ``correct/samples`` per task, the
    perplexity changes and the name of the result it came from (e.g. ``H100``, ``CPU``)."""
    from attnlab.eval.perplexity import with_ppl_changes

    tasks = list(dict.fromkeys(r["task"] for _, res in results for r in res.rows))
    lines = [
        "| method (budget) | phase | density | " + " | ".join(tasks) + " | prefill ppl | decode ppl | run |"
    ]
    lines.append("|" + "---|" * (len(tasks) + 6))
    for i, (where, res) in enumerate(results):
        for m in with_ppl_changes(res.methods):
            if m["length"] != length or (i and m["method"] == DENSE):
                continue
            cells = []
            for t in tasks:
                r = next(
                    (
                        x
                        for x in res.rows
                        if x["label"] == m["label"] and x["length"] == length and x["task"] == t
                    ),
                    None,
                )
                if r is None:
                    cells.append("-")
                elif r.get("error"):
                    cells.append(f"{r['correct']}/{r['samples']}*" if r["samples"] else "error")
                else:
                    cells.append(f"{r['correct']}/{r['samples']}")
            phase = _phase(m)
            lines.append(
                f"| {short_label(m['label'])} | {phase} | {_fmt(m.get(f'{phase}_density'), '.3f')} | "
                + " | ".join(cells)
                + f" | {_pct(m.get('prefill_ppl_change'))} | {_pct(m.get('decode_ppl_change'))} | {where} |"
            )
    return "\n".join(lines)
