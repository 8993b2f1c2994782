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
it next to the file), from which every report and summary reads as from a run made here: in one
transaction, only the rows the database does not hold yet (so runs appended to one file load one after
another, and a run loaded while it was still being written gets the rows it wrote since on the next
load), skipping a row cut off by a killed run with a note.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
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
        # the speedups round by round: median of (baseline's call / the side's call) in each round
        "paired_speedup": "DOUBLE",
        "paired_kernel_speedup": "DOUBLE",
        # the baseline in the same rounds (baseline_ms is its median)
        "baseline_min_ms": "DOUBLE",
        "baseline_q1_ms": "DOUBLE",
        "baseline_q3_ms": "DOUBLE",
        "unstable": "BOOLEAN",
        "few_reps": "BOOLEAN",
        "timed_compiles": "INTEGER",
        # the machine's 1-minute load average right after the row's rounds
        "load_avg": "DOUBLE",
        # CPU: cores' worth of CPU other processes used while the kept rounds ran; the attempts made (a
        # contended row is timed again); whether the kept attempt still shared the machine
        "foreign_cpu": "DOUBLE",
        "attempts": "INTEGER",
        "contended": "BOOLEAN",
        # the timing passes (processes) the row's columns merge, and each pass's speedup as called (a JSON
        # list; NULL with one pass): attnlab.bench.passes
        "passes": "INTEGER",
        "pass_speedups": "VARCHAR",
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
    table's columns and appended, flushed, to a JSON-lines file (timestamps as ISO strings). Runs append to
    an existing file (a file that ends in a cut-off row gets a line break first)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_off = False
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                cut_off = f.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if cut_off:  # a run killed mid-row: this run starts on a line of its own (load_jsonl skips that row)
            self._file.write("\n")

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


@dataclass(frozen=True)
class JsonlLoad:
    """What :func:`load_jsonl` did, run ids in the order of the file: ``loaded`` the runs it inserted,
    ``skipped`` the runs the database already held in full, ``extended`` the runs it already held in part
    (loaded while still being written) whose newer rows it inserted now; the rows inserted, notes (a
    cut-off row skipped, a run extended), and every run id of the file."""

    loaded: list[str]
    skipped: list[str]
    rows: int
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)


#: how a JSON-lines record starts (:class:`JsonlResults` writes ``{"table": ..., "row": ...}``)
_RECORD_START = '{"table": '


def _record(jsonl: Path, number: int, obj: Any) -> tuple[str, dict[str, Any]]:
    """(table, row) of one parsed line, or a ValueError naming the line and what was expected."""
    where = f"{jsonl}:{number}"
    if not isinstance(obj, dict) or obj.get("table") not in TABLES or not isinstance(obj.get("row"), dict):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: expected {{'table': one of {sorted(TABLES)}, 'row': {{...}}}}, got {got}")
    table, row = obj["table"], obj["row"]
    unknown = sorted(set(row) - set(TABLES[table]))
    if unknown:
        raise ValueError(
            f"{where}: table {table} has no columns {unknown} (its columns: {list(TABLES[table])})"
        )
    if not isinstance(row.get("run_id"), str) or not row["run_id"]:
        raise ValueError(f"{where}: a {table} row without a run_id (got {row.get('run_id')!r})")
    if table == "runs" and row.get("started"):
        try:
            row["started"] = datetime.fromisoformat(row["started"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: runs.started {row['started']!r} is not an ISO timestamp") from None
    return table, row


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _BAD


_BAD = object()


def read_jsonl(jsonl: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The (table, row) records of a :class:`JsonlResults` file, in order, and notes on what was skipped.

    A run killed while writing a row leaves that row cut off: at the end of the file, or (when another
    run was appended after it by an older writer) joined to the next run's first record on one line, or
    on its own line just before the next run's ``runs`` record. Such a cut-off row is skipped with a note
    naming its line. Any other line that is not a record is an error naming the line."""
    lines = [(i, line) for i, line in enumerate(jsonl.read_text(encoding="utf-8").split("\n"), 1)]
    lines = [(i, line) for i, line in lines if line.strip()]
    out: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    for pos, (number, line) in enumerate(lines):
        obj = _parse(line)
        if obj is _BAD:
            cut = line.rfind(_RECORD_START)
            rest = _parse(line[cut:]) if cut > 0 else _BAD
            nxt = _parse(lines[pos + 1][1]) if pos + 1 < len(lines) else None
            if rest is not _BAD:  # a cut-off row, then the next run's first record
                notes.append(
                    f"{jsonl}:{number}: skipped a cut-off row ({cut} characters, a run killed while writing "
                    "it) joined to the next record on the same line"
                )
                obj = rest
            elif nxt is None or (isinstance(nxt, dict) and nxt.get("table") == "runs"):
                notes.append(
                    f"{jsonl}:{number}: skipped a cut-off last row of a run ({len(line)} characters, not valid "
                    "JSON: a run killed while writing it)"
                )
                continue
            else:
                raise ValueError(
                    f"{jsonl}:{number}: not valid JSON ({line[:60]!r}...), and not the cut-off last row of a "
                    "run; expected one {'table': ..., 'row': {...}} object per line"
                )
        out.append(_record(jsonl, number, obj))
    return out, notes


def _row_key(cols: list[str], row: dict[str, Any]) -> tuple[Any, ...]:
    """A row's identity: its value in every column of its table (a missing key is NULL; NaN equals NaN)."""
    return tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in (row.get(c) for c in cols))


def _unheld_rows(
    db: ResultsDB, jsonl: Path, records: list[tuple[str, dict[str, Any]]], held: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Per table, the file's rows of runs the database already holds (``held``) that it does not hold yet:
    by row identity (:func:`_row_key`), each row as many times as the file has it more often than the
    database, in the file's order. A run's ``runs`` row is its identity (never loaded twice). A database
    row of such a run that the file does not have is an error: the run in the database was not loaded from
    this file (or the file was rewritten), so appending to it would mix two sources."""
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES if t != "runs"}
    if not held:
        return out
    keep = set(held)
    marks = ", ".join("?" for _ in held)
    for table in out:
        cols = list(TABLES[table])
        stored = Counter(
            (r["run_id"], _row_key(cols, r))
            for r in db.query(f"SELECT * FROM {table} WHERE run_id IN ({marks})", list(held))
        )
        for _, row in (rec for rec in records if rec[0] == table and rec[1]["run_id"] in keep):
            key = (row["run_id"], _row_key(cols, row))
            if stored[key] > 0:
                stored[key] -= 1
            else:
                out[table].append(row)
        extra = sorted({run for (run, _), n in stored.items() if n > 0})
        if extra:
            count = sum(n for (run, _), n in stored.items() if n > 0)
            raise ValueError(
                f"{jsonl}: the database holds {count} {table} row(s) of run(s) {extra} that this file does not "
                "have: those runs were not loaded from this file, or it was rewritten since; nothing was "
                "loaded (load it into another database, or remove those runs first)"
            )
    return out


def load_jsonl(jsonl: Path, db_path: Path) -> JsonlLoad:
    """Insert the rows of a :class:`JsonlResults` file (:func:`read_jsonl`) that the DuckDB file
    ``db_path`` (created if missing) does not hold yet, in one transaction: on any error nothing is
    inserted.

    New runs load whole (a second run appended to the same file loads on the next call). A run the
    database already holds gets only the rows it lacks, by row identity (every column's value, counted
    with multiplicity): a run loaded while it was still being written, or killed, gets the rows written
    since, with a note; loading the same file again inserts nothing. A cut-off row of a killed run is
    skipped with a note. Errors (``ValueError``) name the line or the run: a line that is not a record, a
    row of a run the file and database have no ``runs`` row for, a database row of a run that the file
    does not have (another source), a value the column cannot hold."""
    import duckdb

    records, notes = read_jsonl(jsonl)
    order = list(dict.fromkeys(row["run_id"] for _, row in records))
    declared = {row["run_id"] for table, row in records if table == "runs"}
    with ResultsDB(db_path) as db:
        have = {r["run_id"] for r in db.runs()}
        orphans = [r for r in order if r not in declared and r not in have]
        if orphans:
            raise ValueError(
                f"{jsonl}: rows of run(s) {orphans} without their runs row (the first record a run writes); "
                "nothing was loaded"
            )
        new = [r for r in order if r not in have]
        held = [r for r in order if r in have]
        by_table: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        for table, row in records:
            if row["run_id"] not in have:
                by_table[table].append(row)
        added = _unheld_rows(db, jsonl, records, held)
        grown: Counter[str] = Counter()
        for table, rows in added.items():
            by_table[table].extend(rows)
            grown.update(row["run_id"] for row in rows)
        extended = [r for r in held if grown[r]]
        notes += [
            f"run {r} was in {db_path} already (loaded while it was still being written?): added its {grown[r]} "
            "row(s) written since"
            for r in extended
        ]
        db.con.execute("BEGIN TRANSACTION")
        try:
            n = sum(
                insert_rows(db.con, t, list(TABLES[t]), rows, checkpoint=False)
                for t, rows in by_table.items()
            )
            db.con.execute("COMMIT")
        except duckdb.Error as e:
            db.con.execute("ROLLBACK")
            raise ValueError(f"{jsonl}: loading into {db_path} failed, nothing was loaded: {e}") from None
        except BaseException:
            db.con.execute("ROLLBACK")
            raise
        db.con.execute("CHECKPOINT")
    return JsonlLoad(new, [r for r in held if not grown[r]], n, notes, order, extended)


def insert_rows(
    con: Any, table: str, cols: list[str], rows: Iterable[dict[str, Any]], checkpoint: bool = True
) -> int:
    """Insert rows (keys: ``cols`` of ``table``; an unknown key is an error) into a DuckDB connection and,
    with ``checkpoint``, checkpoint the file: into the database file now, not only its write-ahead log, so a
    run killed by a time limit keeps every row it wrote, even where only the .duckdb file is copied away
    (inside an explicit transaction pass ``checkpoint=False`` and checkpoint after the commit)."""
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
        if checkpoint:
            con.execute("CHECKPOINT")
    return len(data)


def query_rows(con: Any, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """The rows of a query as dicts by column name."""
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
