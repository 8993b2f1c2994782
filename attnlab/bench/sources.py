"""Where a table's numbers come from, when they are merged from several runs and databases.

:func:`merged` reads every ``results.duckdb`` (or ``results.duckdb.gz``) under a folder (read-only) and keeps the
latest row per key, the device included (the run's ``env["device"]``: a CPU row and a GPU row of the same
shape are two rows, never one replacing the other);
:class:`Sources` names the runs behind a table: one run is named above it, several get a tag per cell
(``[a]``, ``[b]``, ...) and a legend with each run's folder, id, commit (dirty flag) and timing method.
"""

from __future__ import annotations

import gzip
import json
import string
import tempfile
from pathlib import Path
from typing import Any

from attnlab.bench.store import ResultsDB

SHAPE = ("dtype", "batch", "heads", "kv_heads", "head_dim")
#: what names one timed row: the device it ran on (``device``: a row's own column where it has one, else its
#: run's ``env["device"]``, :func:`row_device`), the method, backend, budget, pattern, shape, lengths and mode
ROW_KEY = ("device", "method", "backend", "params", "pattern", *SHAPE, "n_q", "n_k", "mode")
Row = dict[str, Any]


def unpacked_db(folder: Path) -> Path:
    """``folder/results.duckdb``, or where only ``results.duckdb.gz`` is there (a CPU run's 2 MB database is
    mostly empty blocks: committed gzipped, it takes ~50 KB), that file unpacked once per process into a
    temporary folder."""
    db = folder / "results.duckdb"
    packed = folder / "results.duckdb.gz"
    if db.exists() or not packed.exists():
        return db
    key = str(packed.resolve())
    if key not in _UNPACKED:
        out = Path(tempfile.mkdtemp(prefix="attnlab-db-")) / "results.duckdb"
        out.write_bytes(gzip.decompress(packed.read_bytes()))
        _UNPACKED[key] = out
    return _UNPACKED[key]


_UNPACKED: dict[str, Path] = {}


def database_folders(root: Path) -> list[Path]:
    """The folders under ``root`` holding a results database, plain or gzipped (:func:`unpacked_db`)."""
    found = {p.parent for p in root.glob("**/results.duckdb")} | {
        p.parent for p in root.glob("**/results.duckdb.gz")
    }
    return sorted(found)


def run_device(run: Row) -> str | None:
    """The device a run ran on (``env["device"]``, e.g. ``NVIDIA H100 80GB HBM3`` or ``CPU x86_64 x2``)."""
    try:
        env = json.loads(run.get("env") or "{}")
    except (TypeError, json.JSONDecodeError):
        return None
    return env.get("device") if isinstance(env, dict) else None


def row_device(row: Row, run: Row) -> str | None:
    """The device of ``row`` of ``run``: its own ``device`` column where it has one, else the run's."""
    return row["device"] if row.get("device") is not None else run_device(run)


def merged(root: Path, table: str, key: tuple[str, ...] = ROW_KEY) -> tuple[list[Row], list[Row]]:
    """(rows, runs): the latest row per key over every run of every database under ``root`` (plain or
    gzipped). The device is always part of the key (whether ``key`` names ``device`` or not): rows of two
    devices never replace each other."""
    found: dict[tuple, tuple[str, Row]] = {}
    for folder_path in database_folders(root):
        db_path = unpacked_db(folder_path)
        with ResultsDB(db_path, read_only=True) as db:
            for run in db.runs():
                rows = db.rows(table, run["run_id"])
                folder = folder_path.relative_to(root).as_posix()
                run = {
                    **run,
                    "folder": root.name if folder == "." else f"{root.name}/{folder}",
                    "has_kernel": False,
                }
                for r in rows:
                    run["has_kernel"] |= r.get("kernel_ms") is not None
                    device = row_device(r, run)
                    k = (device, *(r.get(c) for c in key if c != "device"))
                    if k not in found or str(run["started"]) >= found[k][0]:
                        found[k] = (str(run["started"]), {**r, "_run": run})
    runs = {r["_run"]["run_id"]: r["_run"] for _, r in found.values()}
    return [r for _, r in found.values()], sorted(runs.values(), key=lambda r: str(r["started"]))


def _commit(run: Row) -> str:
    env = json.loads(run["env"])
    dirty = env.get("dirty", run.get("dirty"))
    return f"`{str(env.get('commit'))[:7]}`" + (" (dirty tree)" if dirty else "")


def _timing(run: Row) -> str:
    """How a run timed its rows (older harnesses differ)."""
    if run.get("has_kernel"):
        return "as called (`attnlab.attention` defaults) and kernel, interleaved with the baseline"
    cfg = json.loads(run["config"])
    paired = "paired with the baseline" if cfg.get("paired") else "the baseline timed separately"
    return f"`attnlab.attention(check_finite=False)`, {paired}"


class Sources:
    """The runs behind one table: a caption when there is one, a tag per cell when there are several."""

    def __init__(self, rows: list[Row], timing: bool = True) -> None:
        self.timing = timing
        runs = {r["_run"]["run_id"]: r["_run"] for r in rows}
        self.runs = sorted(runs.values(), key=lambda r: str(r["started"]))
        self.tags = {run["run_id"]: string.ascii_lowercase[i] for i, run in enumerate(self.runs)}

    def tag(self, *rows: Row) -> str:
        """' [a]' (' [a,b]' for a cell averaged over rows of several runs); '' when the table has one run."""
        if len(self.runs) <= 1:
            return ""
        return " [" + ",".join(sorted({self.tags[r["_run"]["run_id"]] for r in rows})) + "]"

    def legend(self) -> str:
        parts = []
        for run in self.runs:
            env = json.loads(run["env"])
            tag = f"[{self.tags[run['run_id']]}] " if len(self.runs) > 1 else ""
            how = f", {_timing(run)}" if self.timing else ""
            parts.append(
                f"{tag}`{run['folder']}/` run `{run['run_id']}` at commit {_commit(run)}{how} "
                f"({env['device']}, torch {env['torch']}, triton {env['triton']})"
            )
        head = "Source" if len(self.runs) == 1 else "Sources (each cell's tag names its run)"
        return f"{head}: " + "; ".join(parts) + "."
