"""One benchmark run, end to end: environment, efficiency (checked and warmed before timed), fidelity,
database, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.bench import efficiency, fidelity, workloads
from attnlab.bench.attention_stats import workload_stats
from attnlab.bench.config import BenchConfig
from attnlab.bench.env import environment
from attnlab.bench.report import write_report
from attnlab.bench.store import ResultsDB, open_results

DB_NAME = "results.duckdb"
STALE = {
    "git": "this copy's .git is older than the tree (the file was staged later)",
    "file": "the ATTNLAB_COMMIT file was left by an earlier staging (older than HEAD) and was not used",
}
#: the attention statistics of a workload (see attention_stats) look at its first this many tokens
STATS_TOKENS = 1024


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
    """Run ``cfg``; rows (and notes) are written to ``cfg.out / results.duckdb`` as they come (to
    ``results.jsonl`` where duckdb is not installed: no report then; ``attnlab report --db`` that file)."""
    env = environment(cfg.torch_device)
    notes: list[str] = []
    checks: list[dict[str, Any]] = []
    store = open_results(cfg.out / DB_NAME)
    db_path = store.path
    with store as db:
        run_id = db.new_run(env, cfg.as_json())

        def note(text: str) -> None:
            notes.append(text)
            db.insert("notes", [{"note": text}], run_id)
            log(text)

        if env.get("dirty"):
            note(f"the tree had uncommitted changes to tracked files (commit {env['commit']}, dirty)")
        for other in ("git", "file"):
            if env.get(f"{other}_commit"):
                note(
                    f"the commit recorded ({env['commit']}, from {env['commit_source']}) is not what {other} says "
                    f"({env[f'{other}_commit']}): {STALE[other]}"
                )
        n_eff = n_fid = 0
        if cfg.efficiency:
            eff = efficiency.EfficiencyRun(cfg, log, advance)
            for row in eff.rows():  # checks and rows go in as they come: a run cut short keeps both
                db.insert("checks", eff.check_rows[len(checks) :], run_id)
                checks = list(eff.check_rows)
                n_eff += db.insert("efficiency", [row], run_id)
            db.insert("checks", eff.check_rows[len(checks) :], run_id)
            checks = list(eff.check_rows)
            for text in eff.notes:
                note(text)
        if cfg.fidelity:
            unrunnable: dict[str, str] = {}
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
                    note(f"workload {name} skipped: {e}")
                    advance(1)
                    continue
                stats = workload_stats(wl.layers, STATS_TOKENS, causal=wl.causal_model is True)
                note(f"workload {name}: {wl.source}; {stats.describe()}")
                rows = list(
                    fidelity.fidelity_rows(
                        wl, cfg.methods, cfg.patterns, cfg.budgets, log, skipped=unrunnable
                    )
                )
                n_fid += db.insert("fidelity", rows, run_id)
                advance(1)
            for name, reason in unrunnable.items():
                note(f"fidelity: {name} was skipped where its call was refused on this device ({reason})")
    path = write_report(db_path, cfg.out, run_id) if report and isinstance(store, ResultsDB) else None
    failed = [
        f"{c['method']}/{c['backend']} {c['pattern']} {c['detail']}"
        for c in checks
        if not c["passed"] and not c.get("skipped")
    ]
    return RunResult(run_id, db_path, path, n_eff, n_fid, failed, notes)


def planned_steps(cfg: BenchConfig) -> int:
    """Progress steps: every efficiency row twice (warmed, then timed), plus one per fidelity workload."""
    rows = efficiency.EfficiencyRun(cfg).entry_count() if cfg.efficiency else 0
    return 2 * rows + (len(cfg.workloads) if cfg.fidelity else 0)
