"""``attnlab eval`` results in DuckDB, with the conventions of the benchmark's results database
(:mod:`attnlab.bench.store`): every row carries its ``run_id``; ``runs`` holds each run's device,
commit (and whether the tree had uncommitted changes), environment and config (the same columns as the
benchmark's ``runs``); ``notes`` what a run had to say (runs left out by a time limit, errors). Tables:

- ``eval_accuracy``: one row per (run, method run, task, length): ``correct`` of ``samples`` (exact match),
  the generated answers as JSON, the error of a run that raised.
- ``eval_methods``: one row per (run, method run, length): densities, median prefill/decode step times,
  held-out prefill/decode losses (nats per token) and perplexity changes against ``softmax`` of the same run.

Parameters are stored as JSON (keys sorted). A GPU machine without duckdb writes the JSON of
:class:`attnlab.eval.tasks.EvalResult`; :func:`store_result` loads it here. Opening a file for writing adds
tables and columns newer than the file.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from attnlab.bench.store import TABLES as BENCH_TABLES
from attnlab.bench.store import insert_rows, query_rows
from attnlab.eval.perplexity import with_ppl_changes
from attnlab.eval.tasks import EvalResult

TABLES: dict[str, dict[str, str]] = {
    "runs": BENCH_TABLES["runs"],
    "notes": BENCH_TABLES["notes"],
    "eval_accuracy": {
        "run_id": "VARCHAR",
        "model": "VARCHAR",
        "method": "VARCHAR",
        "label": "VARCHAR",
        "params": "VARCHAR",
        "budget": "VARCHAR",
        "prefill": "VARCHAR",
        "decode": "VARCHAR",
        "task": "VARCHAR",
        "length": "INTEGER",
        "samples": "INTEGER",
        "correct": "INTEGER",
        "accuracy": "DOUBLE",
        "outputs": "VARCHAR",
        "error": "VARCHAR",
    },
    "eval_methods": {
        "run_id": "VARCHAR",
        "model": "VARCHAR",
        "method": "VARCHAR",
        "label": "VARCHAR",
        "params": "VARCHAR",
        "budget": "VARCHAR",
        "family": "VARCHAR",
        "prefill": "VARCHAR",
        "decode": "VARCHAR",
        "length": "INTEGER",
        "prefill_density": "DOUBLE",
        "decode_density": "DOUBLE",
        "prefill_ms": "DOUBLE",
        "decode_ms": "DOUBLE",
        "timed_prefills": "INTEGER",
        "timed_steps": "INTEGER",
        # a decode-only run that reused softmax's prefill (its prefill time is not measured)
        "shared_prefill": "BOOLEAN",
        "prefill_loss": "DOUBLE",
        "decode_loss": "DOUBLE",
        # exp(loss) / exp(softmax's loss) - 1 at the same length, same run
        "prefill_ppl_change": "DOUBLE",
        "decode_ppl_change": "DOUBLE",
        "ppl_windows": "INTEGER",
        "ppl_prefill_tokens": "INTEGER",
        "ppl_decode_tokens": "INTEGER",
        "seconds": "DOUBLE",
        "error": "VARCHAR",
        # JSON: the backend forced per method (CPU runs; null: the default order)
        "backends": "VARCHAR",
        # JSON: what a dense variant computed without its tensor inputs (attnlab.eval.tasks.function_check)
        "function": "VARCHAR",
    },
}

#: eval_methods columns stored as JSON text (null stays null)
JSON_COLUMNS = ("backends", "function")


class EvalDB:
    """A DuckDB file of ``attnlab eval`` runs (see the module docstring)."""

    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no eval database at {str(self.path)!r}")
            self.con = duckdb.connect(str(self.path), read_only=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path))
        for table, cols in TABLES.items():
            body = ", ".join(f'"{c}" {t}' for c, t in cols.items())
            self.con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body})")
            have = {r[0] for r in self.con.execute(f"DESCRIBE {table}").fetchall()}
            for c, t in cols.items():
                if c not in have:
                    self.con.execute(f'ALTER TABLE {table} ADD COLUMN "{c}" {t.replace(" PRIMARY KEY", "")}')

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> EvalDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def insert(self, table: str, rows: Iterable[dict[str, Any]]) -> int:
        """Insert rows (keys: columns of ``table``; unknown keys are an error) and checkpoint the file."""
        return insert_rows(self.con, table, list(TABLES[table]), rows)

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return query_rows(self.con, sql, params)

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY started")

    def latest_run(self) -> str | None:
        rows = self.runs()
        return rows[-1]["run_id"] if rows else None

    def rows(self, table: str, run_id: str) -> list[dict[str, Any]]:
        return self.query(f"SELECT * FROM {table} WHERE run_id = ?", [run_id])

    def result(self, run_id: str | None = None) -> EvalResult:
        """The run's rows as an :class:`EvalResult` (default: the latest run)."""
        rid = run_id or self.latest_run()
        if rid is None:
            raise LookupError(f"the eval database {str(self.path)!r} holds no runs")
        runs = [r for r in self.runs() if r["run_id"] == rid]
        if not runs:
            raise LookupError(f"the eval database {str(self.path)!r} has no run {rid!r}")
        info = json.loads(runs[0]["config"])
        info["run_id"] = rid
        rows = []
        for r in self.rows("eval_accuracy", rid):
            rows.append({**r, "params": json.loads(r["params"]), "outputs": json.loads(r["outputs"] or "[]")})
        methods = [
            {
                **m,
                "params": json.loads(m["params"]),
                **{c: None if m.get(c) is None else json.loads(m[c]) for c in JSON_COLUMNS},
            }
            for m in self.rows("eval_methods", rid)
        ]
        return EvalResult(rows, info, methods)


def _params(p: Any) -> str:
    return json.dumps(p, sort_keys=True, default=list)


def content_key(result: EvalResult) -> str:
    """A digest of the result's content (info, rows and method rows; a ``run_id`` in ``info``, which a result
    read back from a database carries, left out): the same result loaded twice gives the same key."""
    info = {k: v for k, v in result.info.items() if k not in ("run_id", "kind", "content_key")}
    body = json.dumps(
        {"info": info, "rows": result.rows, "methods": result.methods}, sort_keys=True, default=str
    )
    return hashlib.sha256(body.encode()).hexdigest()


def stored_run(db: EvalDB, result: EvalResult) -> str | None:
    """The run id under which ``db`` already holds ``result``: its ``info["run_id"]`` where ``db`` has that
    run, else a run stored with the same :func:`content_key`; None when it holds neither."""
    key = content_key(result)
    rid = result.info.get("run_id")
    for run in db.runs():
        if rid is not None and run["run_id"] == rid:
            return str(rid)
        try:
            config = json.loads(run["config"] or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(config, dict) and config.get("content_key") == key:
            return str(run["run_id"])
    return None


def store_result(
    db: EvalDB, result: EvalResult, env: dict[str, Any] | None = None, notes: Iterable[str] = ()
) -> str:
    """Write ``result`` as a new run of ``db``; returns its run id. ``env``: device, commit, dirty flag
    and versions (default: what ``result.info`` says). A result ``db`` already holds (the same run id or
    the same content, :func:`stored_run`) is not inserted again: its existing run id is returned."""
    existing = stored_run(db, result)
    if existing is not None:
        return existing
    info = result.info
    env = dict(env or {})
    env.setdefault("device", info.get("device_name") or info.get("device"))
    env.setdefault("commit", info.get("commit"))
    for k in ("torch", "transformers", "device_name"):
        if k in info:
            env.setdefault(k, info[k])
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    db.insert(
        "runs",
        [
            {
                "run_id": run_id,
                "started": datetime.now(UTC).replace(tzinfo=None),
                "device": env.get("device"),
                "commit": env.get("commit"),
                "dirty": env.get("dirty"),
                "env": json.dumps(env),
                "config": json.dumps({"kind": "eval", **info, "content_key": content_key(result)}),
            }
        ],
    )
    model = info.get("model_name") or info.get("model")
    db.insert(
        "eval_accuracy",
        (
            {
                "run_id": run_id,
                "model": model,
                **{
                    k: r.get(k)
                    for k in TABLES["eval_accuracy"]
                    if k not in ("run_id", "model", "params", "outputs")
                },
                "params": _params(r.get("params", {})),
                "outputs": json.dumps(r.get("outputs", [])),
            }
            for r in result.rows
        ),
    )
    db.insert(
        "eval_methods",
        (
            {
                "run_id": run_id,
                "model": model,
                **{
                    k: m.get(k)
                    for k in TABLES["eval_methods"]
                    if k not in ("run_id", "model", "params", *JSON_COLUMNS)
                },
                "params": _params(m.get("params", {})),
                **{c: None if m.get(c) is None else _params(m[c]) for c in JSON_COLUMNS},
            }
            for m in with_ppl_changes(result.methods)
        ),
    )
    extra = [f"left out by the time limit: {s}" for s in info.get("skipped", [])]
    db.insert("notes", ({"run_id": run_id, "note": n} for n in [*notes, *extra]))
    return run_id
