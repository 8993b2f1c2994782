"""The HTML report: one self-contained page (tables + embedded plots) and the PNGs beside it."""

from __future__ import annotations

import base64
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from attnlab.bench import plots
from attnlab.bench.report_tables import busy_above, efficiency_tables, fidelity_table
from attnlab.bench.row_columns import UNSTABLE_SPREAD
from attnlab.bench.store import ResultsDB
from attnlab.bench.timing import MIN_REPS


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode() if png else None


def _eff_groups(rows: list[dict[str, Any]], out: Path, busy: float | None = None) -> list[dict[str, Any]]:
    """The efficiency tables, each with its latency plot (also written as a PNG into ``out``)."""
    groups = efficiency_tables(rows, busy)
    for g in groups:
        png = plots.latency_vs_length(rows, g["pattern"], g["mode"])
        if png:
            (out / f"latency_{g['pattern']}_{g['mode']}.png").write_bytes(png)
        g["png"] = _b64(png)
    return groups


def write_report(db_path: Path, out: Path, run_id: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and the PNGs for ``run_id`` (default: the latest run)."""
    out.mkdir(parents=True, exist_ok=True)
    with ResultsDB(db_path, read_only=True) as db:
        run_id = run_id or db.latest_run()
        if run_id is None:
            raise FileNotFoundError(f"no runs in {db_path}; run `attnlab bench` first")
        run = next((r for r in db.runs() if r["run_id"] == run_id), None)
        if run is None:
            ids = [r["run_id"] for r in db.runs()]
            raise ValueError(f"no run {run_id!r} in {db_path}; its runs: {', '.join(ids) or 'none'}")
        eff = db.rows("efficiency", run_id)
        fid = db.rows("fidelity", run_id)
        checks = db.rows("checks", run_id)
        notes = db.notes(run_id)
    env, config = json.loads(run["env"]), json.loads(run["config"])
    speed_png = plots.speedup_vs_density(eff)
    fid_png = plots.fidelity_vs_density(fid)
    for name, png in (("speedup_vs_density.png", speed_png), ("fidelity_vs_density.png", fid_png)):
        if png:
            (out / name).write_bytes(png)
    baseline = next((r["backend"] for r in eff if r.get("baseline_of_run")), "dense SDPA")
    if config.get("fidelity") and not fid:
        notes.append("fidelity was requested but produced no rows")
    source = files("attnlab.bench").joinpath("templates/report.html").read_text()
    template = jinja2.Environment(autoescape=True).from_string(source)
    skipped = [c for c in checks if c.get("skipped")]
    html = template.render(
        run=run,
        env=env,
        config=config,
        dirty=env.get("dirty", run.get("dirty")),
        baseline_name=f"SDPA ({baseline})",
        checks=checks,
        checks_passed=sum(bool(c["passed"]) for c in checks),
        checks_skipped=[f"{c['method']}/{c['backend']} {c['pattern']}: {c['skipped']}" for c in skipped],
        checks_failed=[
            f"{c['method']}/{c['backend']} {c['pattern']}: {c['detail']}"
            for c in checks
            if not c["passed"] and not c.get("skipped")
        ],
        eff_groups=_eff_groups(eff, out, busy_above(env)),
        speedup_png=_b64(speed_png),
        fidelity=fidelity_table(fid, eff),
        fidelity_png=_b64(fid_png),
        notes=notes,
        unstable_spread=UNSTABLE_SPREAD,
        min_reps=MIN_REPS,
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
