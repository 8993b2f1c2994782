"""The results database: one DuckDB file that accumulates runs.

DuckDB because results are analytical tables queried by run, method, pattern and length: an embedded,
single-file, columnar SQL engine with no server, and files that readers (Python, CLI, notebooks) open
directly. Every row carries its ``run_id``; ``runs`` holds each run's device, versions, commit (and whether
the tree had uncommitted changes) and config; ``notes`` what a run had to say (a workload skipped, ...).

Databases written by older versions lack some columns: opening one for writing adds them (NULL in old
rows); ``read_only=True`` leaves the file untouched and rows simply lack those keys.

Where duckdb is not installed (a GPU machine with only torch), :func:`open_results` gives a
:class:`JsonlResults` instead: the same writes, each row appended at once to ``results.jsonl`` (one JSON
object per line: ``{"table": ..., "row": {...}}``), so a run cut short keeps every row it wrote.
:func:`load_jsonl` inserts such a file into a DuckDB database (``attnlab report --db results.jsonl`` does
it next to the file), from which every report and summary reads as from a run made here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

TABLES: dict[str, dict[str, str]] = {
    "runs": {
        "run_id": "VARCHAR PRIMARY KEY",
        "started": "TIMESTAMP",
        "device": "VARCHAR",
        "commit": "VARCHAR",
        "dirty": "BOOLEAN",
        "env": "VARCHAR",
        "config": "VARCHAR",
    },
    "efficiency": {
        "run_id": "VARCHAR",
        "method": "VARCHAR",
        "backend": "VARCHAR",
        "params": "VARCHAR",
        "pattern": "VARCHAR",
        "batch": "INTEGER",
        "heads": "INTEGER",
        "kv_heads": "INTEGER",
        "n_q": "INTEGER",
        "n_k": "INTEGER",
        "head_dim": "INTEGER",
        "dtype": "VARCHAR",
        "mode": "VARCHAR",
        "status": "VARCHAR",
        # as called (attnlab.attention with defaults; for SDPA peers the SDPA call): median, min, quartiles
        "median_ms": "DOUBLE",
        "min_ms": "DOUBLE",
        "reps": "INTEGER",
        "peak_mem_mb": "DOUBLE",
        "tflops": "DOUBLE",
        "speedup": "DOUBLE",
        "baseline_ms": "DOUBLE",
        "baseline_of_run": "BOOLEAN",
        "density": "DOUBLE",
        "block_density": "DOUBLE",
        "compiles": "INTEGER",
        "q1_ms": "DOUBLE",
        "q3_ms": "DOUBLE",
        # the backend's executor alone, timed in the same rounds
        "kernel_ms": "DOUBLE",
        "kernel_min_ms": "DOUBLE",
        "kernel_q1_ms": "DOUBLE",
        "kernel_q3_ms": "DOUBLE",
        "kernel_speedup": "DOUBLE",
        # the baseline in the same rounds (baseline_ms is its median)
        "baseline_min_ms": "DOUBLE",
        "baseline_q1_ms": "DOUBLE",
        "baseline_q3_ms": "DOUBLE",
        "unstable": "BOOLEAN",
        "few_reps": "BOOLEAN",
        "timed_compiles": "INTEGER",
        # the machine's 1-minute load average right after the row's rounds
        "load_avg": "DOUBLE",
    },
    "fidelity": {
        "run_id": "VARCHAR",
        "workload": "VARCHAR",
        "layer": "VARCHAR",
        "head": "INTEGER",
        "method": "VARCHAR",
        "params": "VARCHAR",
        "backend": "VARCHAR",
        "pattern": "VARCHAR",
        "n": "INTEGER",
        "density": "DOUBLE",
        "out_rel_err": "DOUBLE",
        "mass_recall": "DOUBLE",
        "out_err_vs_uniform": "DOUBLE",
        "block_density": "DOUBLE",
        "model_causal": "BOOLEAN",
    },
    "checks": {
        "run_id": "VARCHAR",
        "method": "VARCHAR",
        "backend": "VARCHAR",
        "params": "VARCHAR",
        "pattern": "VARCHAR",
        "dtype": "VARCHAR",
        "grad": "BOOLEAN",
        "passed": "BOOLEAN",
        "detail": "VARCHAR",
        "skipped": "VARCHAR",
    },
    "notes": {
        "run_id": "VARCHAR",
        "note": "VARCHAR",
    },
}


class _Writer:
    """What both stores share: a context manager that closes, and a new run as a row of ``runs``."""

    def close(self) -> None:
        raise NotImplementedError

    def insert(self, table: str, rows: Iterable[dict[str, Any]], run_id: str | None = None) -> int:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_run(self, env: dict[str, Any], config: dict[str, Any]) -> str:
        row = run_row(env, config)
        self.insert("runs", [row])
        return str(row["run_id"])


class ResultsDB(_Writer):
    """A DuckDB results file; tables (and columns newer than the file) are added on open for writing."""

    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        import duckdb

        self.path = Path(path)
        self.read_only = read_only
        if read_only:
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

    def has_table(self, table: str) -> bool:
        names = {r[0] for r in self.con.execute("SHOW TABLES").fetchall()}
        return table in names

    def close(self) -> None:
        self.con.close()

    def insert(self, table: str, rows: Iterable[dict[str, Any]], run_id: str | None = None) -> int:
        rows = rows if run_id is None else ({**row, "run_id": run_id} for row in rows)
        return insert_rows(self.con, table, list(TABLES[table]), rows)

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return query_rows(self.con, sql, params)

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY started")

    def latest_run(self, device_type: str | None = None) -> str | None:
        rows = self.runs()
        if device_type:
            rows = [r for r in rows if json.loads(r["env"]).get("device_type") == device_type]
        return rows[-1]["run_id"] if rows else None

    def rows(self, table: str, run_id: str) -> list[dict[str, Any]]:
        """The run's rows of ``table`` (none when an older file has no such table)."""
        if self.read_only and not self.has_table(table):
            return []
        return self.query(f"SELECT * FROM {table} WHERE run_id = ?", [run_id])

    def notes(self, run_id: str) -> list[str]:
        return [r["note"] for r in self.rows("notes", run_id)]


def run_row(env: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A new run's row of ``runs``: a fresh id (UTC start time + 6 hex digits), device, commit, dirty flag,
    environment and config as JSON."""
    now = datetime.now(UTC)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        "started": now.replace(tzinfo=None),
        "device": env.get("device"),
        "commit": env.get("commit"),
        "dirty": env.get("dirty"),
        "env": json.dumps(env),
        "config": json.dumps(config),
    }


class JsonlResults(_Writer):
    """The writing half of :class:`ResultsDB` without duckdb: every inserted row is checked against the
    table's columns and appended, flushed, to a JSON-lines file (timestamps as ISO strings)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()

    def insert(self, table: str, rows: Iterable[dict[str, Any]], run_id: str | None = None) -> int:
        cols = TABLES[table]
        n = 0
        for row in rows:
            row = row if run_id is None else {**row, "run_id": run_id}
            unknown = set(row) - set(cols)
            if unknown:
                raise KeyError(f"table {table} has no columns {sorted(unknown)}")
            line = {"table": table, "row": {k: _jsonable(v) for k, v in row.items()}}
            self._file.write(json.dumps(line) + "\n")
            n += 1
        self._file.flush()
        return n


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def open_results(db_path: Path) -> ResultsDB | JsonlResults:
    """The results store a run writes to: the DuckDB file ``db_path``, or, where duckdb cannot be imported,
    a :class:`JsonlResults` at ``db_path`` with the suffix ``.jsonl``."""
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return JsonlResults(db_path.with_suffix(".jsonl"))
    return ResultsDB(db_path)


def load_jsonl(jsonl: Path, db_path: Path) -> list[str]:
    """Insert every row of a :class:`JsonlResults` file into the DuckDB file ``db_path`` (created if
    missing); returns the run ids it held. A run already in the database is refused (loaded twice)."""
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_table: dict[str, list[dict[str, Any]]] = {}
    for i, line in enumerate(lines, 1):
        if (
            not isinstance(line, dict)
            or line.get("table") not in TABLES
            or not isinstance(line.get("row"), dict)
        ):
            raise ValueError(f"{jsonl}:{i}: expected {{'table': one of {sorted(TABLES)}, 'row': {{...}}}}")
        by_table.setdefault(line["table"], []).append(line["row"])
    runs = by_table.get("runs", [])
    for r in runs:
        r["started"] = datetime.fromisoformat(r["started"]) if r.get("started") else None
    ids = [str(r["run_id"]) for r in runs]
    with ResultsDB(db_path) as db:
        have = {r["run_id"] for r in db.runs()}
        again = sorted(set(ids) & have)
        if again:
            raise ValueError(f"{db_path} already holds run(s) {again} from {jsonl}")
        for table in TABLES:
            db.insert(table, by_table.get(table, []))
    return ids


def insert_rows(con: Any, table: str, cols: list[str], rows: Iterable[dict[str, Any]]) -> int:
    """Insert rows (keys: ``cols`` of ``table``; an unknown key is an error) into a DuckDB connection and
    checkpoint the file: into the database file now, not only its write-ahead log, so a run killed by a
    time limit keeps every row it wrote, even where only the .duckdb file is copied away."""
    data = []
    for row in rows:
        unknown = set(row) - set(cols)
        if unknown:
            raise KeyError(f"table {table} has no columns {sorted(unknown)}")
        data.append([row.get(c) for c in cols])
    if data:
        quoted = ", ".join(f'"{c}"' for c in cols)
        marks = ", ".join("?" for _ in cols)
        con.executemany(f"INSERT INTO {table} ({quoted}) VALUES ({marks})", data)
        con.execute("CHECKPOINT")
    return len(data)


def query_rows(con: Any, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """The rows of a query as dicts by column name."""
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
