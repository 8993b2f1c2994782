"""attnlab.bench.store: results.jsonl (written where duckdb is missing) loads into DuckDB run by run, in one
transaction, past a row cut off by a killed run; bad files get errors naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnlab.bench.store import JsonlResults, ResultsDB, load_jsonl
from attnlab.cli import app


def _run(path: Path, method: str, rows: int = 2) -> str:
    """Append one run (its runs row, ``rows`` efficiency rows and a note) to a JSON-lines file."""
    with JsonlResults(path) as store:
        run_id = store.new_run({"device": "cpu", "commit": "abc1234", "dirty": False}, {"lengths": [128]})
        store.insert(
            "efficiency",
            [
                {"method": method, "backend": "sdpa", "n_q": 128 * (i + 1), "median_ms": 1.0 + i}
                for i in range(rows)
            ],
            run_id=run_id,
        )
        store.insert("notes", [{"note": f"{method} run"}], run_id=run_id)
    return run_id


def _count(db_path: Path, table: str) -> int:
    with ResultsDB(db_path, read_only=True) as db:
        return int(db.query(f"SELECT count(*) AS n FROM {table}")[0]["n"])


@pytest.mark.duckdb
def test_runs_appended_to_one_file_load_one_after_another(tmp_path: Path) -> None:
    jsonl, db = tmp_path / "results.jsonl", tmp_path / "results.duckdb"
    first = _run(jsonl, "softmax")
    done = load_jsonl(jsonl, db)
    assert (done.loaded, done.skipped, done.rows, done.notes) == ([first], [], 4, [])
    second = _run(jsonl, "sliding_window", rows=3)
    done = load_jsonl(jsonl, db)
    assert (done.loaded, done.skipped, done.order) == ([second], [first], [first, second])
    assert done.rows == 1 + 3 + 1
    again = load_jsonl(jsonl, db)
    assert (again.loaded, again.skipped, again.rows) == ([], [first, second], 0)
    with ResultsDB(db, read_only=True) as d:
        assert {r["run_id"] for r in d.runs()} == {first, second}
        assert [r["method"] for r in d.rows("efficiency", second)] == ["sliding_window"] * 3
        assert d.notes(first) == ["softmax run"]
        assert all(r["started"] is not None for r in d.runs())


def _cut_last_row(path: Path, keep: int = 25) -> None:
    """A run killed while writing its last row: the row is cut after ``keep`` characters."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:-1], lines[-1][:keep]]))


@pytest.mark.duckdb
def test_a_cut_off_last_row_is_skipped_with_a_note(tmp_path: Path) -> None:
    jsonl, db = tmp_path / "results.jsonl", tmp_path / "results.duckdb"
    run_id = _run(jsonl, "softmax", rows=3)  # runs, 3 efficiency rows, a note: 5 lines
    _cut_last_row(jsonl)
    done = load_jsonl(jsonl, db)
    assert done.loaded == [run_id] and done.rows == 4
    (note,) = done.notes
    assert f"{jsonl}:5" in note and "cut-off" in note
    assert _count(db, "efficiency") == 3 and _count(db, "notes") == 0


@pytest.mark.duckdb
def test_a_run_appended_after_a_killed_one_loads_both(tmp_path: Path) -> None:
    """The writer starts a new run on a line of its own after a cut-off row; the loader skips that row.
    A file from an older writer, where the next run's first record joined the cut-off row, loads too."""
    jsonl, db = tmp_path / "results.jsonl", tmp_path / "results.duckdb"
    killed = _run(jsonl, "softmax", rows=2)
    _cut_last_row(jsonl)
    after = _run(jsonl, "sliding_window", rows=1)
    assert len(jsonl.read_text().splitlines()) == 4 + 3
    done = load_jsonl(jsonl, db)
    assert done.loaded == [killed, after] and len(done.notes) == 1 and f"{jsonl}:4" in done.notes[0]
    assert _count(db, "efficiency") == 3 and _count(db, "notes") == 1

    old = tmp_path / "old.jsonl"
    lines = jsonl.read_text().splitlines()
    old.write_text(
        "\n".join([*lines[:3], lines[3] + lines[4], *lines[5:]]) + "\n"
    )  # no line break after the cut
    done = load_jsonl(old, tmp_path / "old.duckdb")
    assert done.loaded == [killed, after] and "joined to the next record" in done.notes[0]
    assert _count(tmp_path / "old.duckdb", "efficiency") == 3


@pytest.mark.duckdb
def test_a_corrupt_line_before_the_end_is_an_error_and_loads_nothing(tmp_path: Path) -> None:
    jsonl, db = tmp_path / "results.jsonl", tmp_path / "results.duckdb"
    _run(jsonl, "softmax", rows=3)
    lines = jsonl.read_text().splitlines()
    lines[2] = lines[2][:30]  # an efficiency row in the middle of a run
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:3: not valid JSON"):
        load_jsonl(jsonl, db)
    assert not db.exists()  # the file is read in full before the database is opened


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"table": "efficiency", "row": {"run_id": "r", "speed": 1}},
            r":2: table efficiency has no columns \['speed'\]",
        ),
        ({"table": "timings", "row": {}}, r":2: expected \{'table': one of"),
        ({"table": "notes", "row": {"note": "x"}}, r":2: a notes row without a run_id"),
        (
            {"table": "efficiency", "row": {"run_id": "elsewhere"}},
            r"run\(s\) \['elsewhere'\] without their runs row",
        ),
    ],
)
@pytest.mark.duckdb
def test_malformed_records_are_errors_naming_the_line(tmp_path: Path, record: dict, expected: str) -> None:
    jsonl = tmp_path / "results.jsonl"
    _run(jsonl, "softmax", rows=1)
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join([lines[0], json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=expected):
        load_jsonl(jsonl, tmp_path / "results.duckdb")


@pytest.mark.duckdb
def test_loading_is_one_transaction(tmp_path: Path) -> None:
    """A value a column cannot hold in a table inserted after runs and efficiency: the run's runs and
    efficiency rows inserted before it are rolled back; the run loaded earlier stays."""
    jsonl, db = tmp_path / "results.jsonl", tmp_path / "results.duckdb"
    good = _run(jsonl, "softmax")
    load_jsonl(jsonl, db)
    bad = _run(jsonl, "sliding_window")
    with jsonl.open("a") as f:
        f.write(json.dumps({"table": "checks", "row": {"run_id": bad, "passed": "maybe"}}) + "\n")
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_jsonl(jsonl, db)
    with ResultsDB(db, read_only=True) as d:
        assert [r["run_id"] for r in d.runs()] == [good]
        assert len(d.rows("efficiency", good)) == 2 and not d.rows("efficiency", bad)


@pytest.mark.duckdb
def test_report_turns_load_errors_into_one_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "results.jsonl"
    _run(jsonl, "softmax", rows=1)
    with jsonl.open("a") as f:
        f.write(json.dumps({"table": "efficiency", "row": {"run_id": "x", "speed": 1}}) + "\n")
        f.write(json.dumps({"table": "notes", "row": {"run_id": "x", "note": "n"}}) + "\n")
    cli = CliRunner().invoke(app, ["report", "--db", str(jsonl)])
    assert cli.exit_code == 2
    (line,) = cli.output.strip().splitlines()
    assert line.startswith(f"cannot load {jsonl}: {jsonl}:4: table efficiency has no columns ['speed']")

    fine = tmp_path / "fine" / "results.jsonl"
    fine.parent.mkdir()
    _run(fine, "softmax", rows=1)
    cli = CliRunner().invoke(app, ["report", "--db", str(fine), "--run", "nope"])
    assert cli.exit_code == 2
    assert cli.output.strip().splitlines()[-1].startswith("cannot report") and "no run 'nope'" in cli.output
