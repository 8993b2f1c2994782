"""The command line refuses what it cannot do before doing any work, in one line naming what was given and
what was expected: unusable output locations, devices this machine lacks, empty or non-integer lengths,
options --load would ignore, a --bench folder that is not there; and it does what the options say
(--load --out writes the result, a result loaded twice is stored once, --db takes a .duckdb.gz)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from attnlab import cli
from attnlab.cli import app
from attnlab.eval.tasks import DENSE, EvalResult
from attnlab.organisms.checkpoint import organism_path

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=400))


def one_line_error(res: Any, *parts: str) -> None:
    """Exit 2, no traceback, and one error line naming every part."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    (line,) = [x for x in res.output.splitlines() if x.startswith("error: ")]
    for p in parts:
        assert p in line, (p, res.output)


def eval_result() -> EvalResult:
    rows = [
        {
            "method": m,
            "label": m,
            "params": {},
            "task": "passkey",
            "length": 256,
            "samples": 2,
            "correct": c,
            "accuracy": c / 2,
            "outputs": ["1", "2"],
            "error": None,
        }
        for m, c in ((DENSE, 2), ("streaming", 1))
    ]
    methods = [{"method": m, "label": m, "params": {}, "length": 256, "family": f, "prefill_ms": 1.0, "decode_ms": 1.0,
                "prefill_density": d, "decode_density": d, "error": None}
               for m, f, d in ((DENSE, "dense", 1.0), ("streaming", "static", 0.5))]  # fmt: skip
    return EvalResult(rows, {"model": "m", "lengths": [256], "tasks": ["passkey"], "samples": 2}, methods)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("x")
    return f


def test_bench_out_under_a_file_fails_up_front(a_file: Path) -> None:
    res = runner.invoke(app, ["bench", "--device", "cpu", "--lengths", "256", "--out", str(a_file / "out")])
    one_line_error(res, f"--out {a_file / 'out'}", f"{a_file} is a file, not a folder")


@pytest.mark.duckdb
def test_report_out_under_a_file_and_db_folder_or_gz(tmp_path: Path, a_file: Path) -> None:
    from attnlab.bench.store import ResultsDB

    db = tmp_path / "b" / "results.duckdb"
    with ResultsDB(db) as store:
        store.new_run({"device": "CPU x", "commit": "abc", "dirty": False}, {})
    res = runner.invoke(app, ["report", "--db", str(db), "--out", str(a_file / "rep")])
    one_line_error(res, f"--out {a_file / 'rep'}", "is a file, not a folder")
    res = runner.invoke(app, ["report", "--db", str(db.parent)])
    one_line_error(res, f"--db {db.parent}: it is a folder", f"--db {db}", "expected a results database file")
    packed = tmp_path / "g" / "results.duckdb.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(db.read_bytes()))
    res = runner.invoke(app, ["report", "--db", str(packed)])
    assert res.exit_code == 0, res.output
    assert (packed.parent / "report.html").is_file() and not (packed.parent / "results.duckdb").exists()
    bad = tmp_path / "bad.duckdb.gz"
    bad.write_text("not gzip")
    one_line_error(runner.invoke(app, ["report", "--db", str(bad)]), f"--db {bad}: cannot unpack it")
    text = tmp_path / "text.duckdb"
    text.write_text("not a database")
    one_line_error(runner.invoke(app, ["report", "--db", str(text)]), f"--db {text}: cannot read it")


def test_eval_out_db_and_report_locations_fail_before_any_work(
    a_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attnlab.eval.tasks as tasks

    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("evaluated before checking the output locations")

    monkeypatch.setattr(tasks, "evaluate", no_work)
    base = ["eval", "--model", str(organism_path("micro")), "--device", "cpu", "--lengths", "256"]
    res = runner.invoke(app, [*base, "--out", str(a_file / "x.json")])
    one_line_error(res, f"--out {a_file / 'x.json'}: its folder {a_file}: it is a file, not a folder")
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "ok.json"), "--report", str(a_file / "r")])
    one_line_error(res, f"--report {a_file / 'r'}", "is a file, not a folder")
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "ok.json"), "--db", str(a_file / "e.duckdb")])
    one_line_error(res, f"--db {a_file / 'e.duckdb'}")
    res = runner.invoke(app, [*base, "--out", str(tmp_path)])
    one_line_error(res, f"--out {tmp_path}: it is a folder")


def test_eval_device_is_validated() -> None:
    base = ["eval", "--model", str(organism_path("micro")), "--no-db", "--no-report"]
    one_line_error(runner.invoke(app, [*base, "--device", "gpu"]), "device 'gpu'")
    if not torch.cuda.is_available():
        one_line_error(runner.invoke(app, [*base, "--device", "cuda"]), "device 'cuda'", "no CUDA GPU")


def test_eval_and_bench_lengths_and_tasks_must_be_given_and_integers(tmp_path: Path) -> None:
    base = [
        "eval",
        "--model",
        str(organism_path("micro")),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o.json"),
    ]
    one_line_error(runner.invoke(app, [*base, "--lengths", ""]), "--lengths ''", "at least one length")
    one_line_error(runner.invoke(app, [*base, "--tasks", " , "]), "--tasks ' , '", "at least one task")
    one_line_error(
        runner.invoke(app, [*base, "--lengths", "25x"]),
        "--lengths '25x'",
        "expected comma-separated integers",
    )
    res = runner.invoke(
        app, ["bench", "--device", "cpu", "--lengths", "256,25x", "--out", str(tmp_path / "b")]
    )
    flat = " ".join(res.output.replace("│", " ").split())  # (typer's error box wraps the line)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert "--lengths '256,25x': '25x' is not an integer; expected comma-separated integers" in flat
    assert "invalid literal" not in flat


def test_eval_load_writes_out_and_refuses_options_it_would_ignore(tmp_path: Path) -> None:
    src = eval_result().write(tmp_path / "gpu.json")
    res = runner.invoke(app, ["eval", "--load", str(src), "--out", str(tmp_path / "m" / "merged.json"), "--no-db",
                              "--no-report"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert EvalResult.read(tmp_path / "m" / "merged.json").rows == EvalResult.read(src).rows
    for extra in (["--model", "x"], ["--methods", "streaming"], ["--lengths", "512"], ["--device", "cpu"]):
        res = runner.invoke(app, ["eval", "--load", str(src), "--no-db", "--no-report", *extra])
        one_line_error(res, f"{extra[0]} would be ignored")


def test_eval_bench_folder_must_exist(tmp_path: Path) -> None:
    src = eval_result().write(tmp_path / "gpu.json")
    res = runner.invoke(
        app, ["eval", "--load", str(src), "--no-db", "--bench", str(tmp_path / "no" / "such")]
    )
    one_line_error(res, f"--bench {tmp_path / 'no' / 'such'}: no such folder")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["eval", "--load", str(src), "--no-db", "--report", str(tmp_path / "r"), "--bench",
                              str(tmp_path / "empty")])  # fmt: skip
    assert (
        res.exit_code == 0
        and "warning" in res.output
        and f"--bench {tmp_path / 'empty'}: no results.duckdb" in res.output
    )
    assert "bench attn speedup@256" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.duckdb
def test_eval_load_twice_stores_the_run_once(tmp_path: Path) -> None:
    from attnlab.eval.store import EvalDB

    src = eval_result().write(tmp_path / "gpu.json")
    args = ["eval", "--load", str(src), "--db", str(tmp_path / "e.duckdb"), "--no-report"]
    first = runner.invoke(app, args)
    again = runner.invoke(app, args)
    assert first.exit_code == again.exit_code == 0, again.output
    assert "already stored: not added again" in again.output
    with EvalDB(tmp_path / "e.duckdb", read_only=True) as db:
        assert len(db.runs()) == 1 and len(db.query("SELECT * FROM eval_accuracy")) == 2
