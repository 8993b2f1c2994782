"""One benchmark run, end to end: environment, efficiency (checked before timed), fidelity, database, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnlab.bench import efficiency, fidelity, workloads
from attnlab.bench.config import BenchConfig
from attnlab.bench.env import environment
from attnlab.bench.report import write_report
from attnlab.bench.store import ResultsDB

DB_NAME = "results.duckdb"


@dataclass
class RunResult:
    run_id: str
    db_path: Path
    report: Path | None
    efficiency_rows: int
    fidelity_rows: int
    failed_checks: list[str]
    notes: list[str]


def run(
    cfg: BenchConfig,
    *,
    log: Callable[[str], None] = lambda s: None,
    advance: Callable[[int], None] = lambda n: None,
    report: bool = True,
) -> RunResult:
    """Run ``cfg``; rows are written to ``cfg.out / results.duckdb`` as they come."""
    env = environment(cfg.torch_device)
    db_path = cfg.out / DB_NAME
    notes: list[str] = []
    with ResultsDB(db_path) as db:
        run_id = db.new_run(env, cfg.as_json())
        n_eff = n_fid = 0
        checks: list[dict] = []
        if cfg.efficiency:
            eff = efficiency.EfficiencyRun(cfg, log)
            for row in eff.rows():  # checks and rows go in as they come: a run cut short keeps both
                db.insert("checks", eff.check_rows[len(checks) :], run_id)
                checks = list(eff.check_rows)
                n_eff += db.insert("efficiency", [row], run_id)
                advance(1)
            db.insert("checks", eff.check_rows[len(checks) :], run_id)
            checks = list(eff.check_rows)
        if cfg.fidelity:
            for name in cfg.workloads:
                try:
                    wl = workloads.load(
                        name,
                        cfg.torch_device,
                        cfg.fidelity_length,
                        cfg.fidelity_heads,
                        cfg.head_dim,
                        cfg.seed,
                    )
                except workloads.WorkloadUnavailable as e:
                    notes.append(f"workload {name} skipped: {e}")
                    log(notes[-1])
                    continue
                rows = list(fidelity.fidelity_rows(wl, cfg.methods, cfg.patterns, cfg.budgets, log))
                n_fid += db.insert("fidelity", rows, run_id)
                advance(1)
    path = write_report(db_path, cfg.out, run_id) if report else None
    failed = [f"{c['method']}/{c['backend']} {c['pattern']} {c['detail']}" for c in checks if not c["passed"]]
    return RunResult(run_id, db_path, path, n_eff, n_fid, failed, notes)


def planned_steps(cfg: BenchConfig) -> int:
    """Rough count of progress steps (efficiency rows + workloads) for a progress bar."""
    eff = efficiency.EfficiencyRun(cfg)
    plan = eff.plan() if cfg.efficiency else []
    peers = 3 if cfg.device.startswith("cuda") else 1
    rows = 0
    if cfg.efficiency:
        import attnlab

        rows = sum(len(attnlab.get(r.method).backends) for r in plan) + peers * len(eff.groups())
    return rows + (len(cfg.workloads) if cfg.fidelity else 0)
