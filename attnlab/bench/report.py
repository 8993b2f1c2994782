"""The HTML report: one self-contained page (tables + embedded plots) and the PNGs beside it."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from attnlab.bench import plots
from attnlab.bench.store import ResultsDB


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}"


def _eff_groups(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    groups = []
    keys = sorted({(r["pattern"], r["mode"]) for r in rows})
    for pattern, mode in keys:
        sel = [r for r in rows if r["pattern"] == pattern and r["mode"] == mode]
        lengths = sorted({r["n_k"] for r in sel})
        by_row: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        dens: dict[tuple[str, str, str], tuple[float, float]] = {}
        for r in sel:
            key = (r["method"], r["params"], r["backend"])
            by_row[key][r["n_k"]] = r
            dens[key] = (r["density"], r["block_density"])
        table = []
        for key in sorted(by_row, key=lambda k: (k[0] != "softmax", k[0], k[1], k[2])):
            cells: list[dict[str, Any]] = []
            for n in lengths:
                cell = by_row[key].get(n)
                if cell is None:
                    cells.append({"ms": "", "speedup": ""})
                elif cell["status"] != "ok":
                    status = cell["status"]
                    cells.append({"ms": status.split(":")[0], "speedup": "", "bad": True, "title": status})
                else:
                    cells.append({"ms": _fmt(cell["median_ms"]), "speedup": _fmt(cell["speedup"])})
            d, bd = dens[key]
            table.append(
                {
                    "method": key[0],
                    "params": key[1],
                    "backend": key[2],
                    "density": _fmt(d),
                    "block_density": _fmt(bd),
                    "cells": cells,
                }
            )
        png = plots.latency_vs_length(sel, pattern, mode)
        if png:
            (out / f"latency_{pattern}_{mode}.png").write_bytes(png)
        groups.append(
            {
                "pattern": pattern,
                "mode": mode,
                "lengths": lengths,
                "rows": table,
                "png": base64.b64encode(png).decode() if png else None,
            }
        )
    return groups


def _fidelity_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["pattern"], r["method"], r["params"], r["n"])].append(r)
    out = []
    for (workload, pattern, method, params, n), rs in sorted(groups.items()):
        rec = [r["mass_recall"] for r in rs]
        err = [r["out_rel_err"] for r in rs]
        out.append(
            {
                "workload": workload,
                "pattern": pattern,
                "method": method,
                "params": params,
                "n": n,
                "density": _fmt(sum(r["density"] for r in rs) / len(rs)),
                "recall_mean": _fmt(sum(rec) / len(rec), 4),
                "recall_min": _fmt(min(rec), 4),
                "err_mean": _fmt(sum(err) / len(err)),
                "err_max": _fmt(max(err)),
            }
        )
    return out


def write_report(db_path: Path, out: Path, run_id: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and the PNGs for ``run_id`` (default: the latest run)."""
    out.mkdir(parents=True, exist_ok=True)
    with ResultsDB(db_path) as db:
        run_id = run_id or db.latest_run()
        if run_id is None:
            raise FileNotFoundError(f"no runs in {db_path}; run `attnlab bench` first")
        run = next(r for r in db.runs() if r["run_id"] == run_id)
        eff = db.rows("efficiency", run_id)
        fid = db.rows("fidelity", run_id)
        checks = db.rows("checks", run_id)
    env, config = json.loads(run["env"]), json.loads(run["config"])
    speed_png = plots.speedup_vs_density(eff)
    fid_png = plots.fidelity_vs_density(fid)
    for name, png in (("speedup_vs_density.png", speed_png), ("fidelity_vs_density.png", fid_png)):
        if png:
            (out / name).write_bytes(png)
    baseline = next((r["backend"] for r in eff if r.get("baseline_of_run")), "dense SDPA")
    notes = []
    if config.get("fidelity") and not fid:
        notes.append("fidelity was requested but produced no rows")
    source = files("attnlab.bench").joinpath("templates/report.html").read_text()
    template = jinja2.Environment(autoescape=True).from_string(source)
    html = template.render(
        run=run,
        env=env,
        config=config,
        baseline_name=f"SDPA ({baseline})",
        checks=checks,
        checks_passed=sum(bool(c["passed"]) for c in checks),
        checks_failed=[f"{c['method']}/{c['backend']} {c['pattern']}" for c in checks if not c["passed"]],
        eff_groups=_eff_groups(eff, out),
        speedup_png=base64.b64encode(speed_png).decode() if speed_png else None,
        fidelity=_fidelity_table(fid),
        fidelity_png=base64.b64encode(fid_png).decode() if fid_png else None,
        notes=notes,
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
