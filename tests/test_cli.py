"""The attnlab command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

import attnlab
from attnlab.cli import app
from attnlab.support import readme_block

runner = CliRunner()


def test_list_table_json_and_markdown() -> None:
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "sliding_window" in res.output
    res = runner.invoke(app, ["list", "--json"])
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list(attnlab.methods())
    res = runner.invoke(app, ["list", "--markdown"])
    assert res.output.strip() == readme_block()


def test_verify_a_method_on_cpu() -> None:
    res = runner.invoke(app, ["verify", "--device", "cpu", "--methods", "sliding_window"])
    assert res.exit_code == 0, res.output
    assert "passed, 0 failed" in res.output


def test_verify_in_worker_processes_gives_the_serial_results(tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    args = ["verify", "--device", "cpu", "--methods", "streaming,softmax", "--jobs", "2", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    parallel = [json.loads(line) for line in out.read_text().splitlines()]
    from attnlab.verify import verify

    serial = verify(torch.device("cpu"), ("streaming", "softmax"))
    key = lambda r: (r["method"], r["backend"], r["case"])
    assert sorted(map(key, parallel)) == sorted((c.method, c.backend, c.case.label()) for c in serial)
    assert all(r["passed"] or r["skipped"] for r in parallel) and len(parallel) == len(serial) > 4


def test_bench_and_report_commands(tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = runner.invoke(
        app,
        [
            "bench",
            "--device",
            "cpu",
            "--lengths",
            "128",
            "--methods",
            "softmax,streaming",
            "--modes",
            "fwd",
            "--patterns",
            "causal_self",
            "--heads",
            "2",
            "--head-dim",
            "64",
            "--workloads",
            "random",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "results.duckdb").exists() and (out / "report.html").exists()
    (out / "report.html").unlink()
    res = runner.invoke(app, ["report", "--db", str(out / "results.duckdb")])
    assert res.exit_code == 0 and (out / "report.html").exists()


def test_bench_rejects_unknown_method(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "--methods", "slidingwindow", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "Did you mean 'sliding_window'" in str(res.exception)


def test_report_without_database(tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", "--db", str(tmp_path / "none.duckdb")])
    assert res.exit_code == 1 and "no results database" in res.output


def test_python_dash_m_and_import_side_effects() -> None:
    code = (
        "import os, sys; before = dict(os.environ); import attnlab, torch; "
        "assert dict(os.environ) == before, 'import changed the environment'; "
        "assert not hasattr(torch.ops.attnlab, 'sigmoid_fwd') or 'attnlab.kernels.sigmoid.op' not in sys.modules; "
        "assert 'triton' not in sys.modules, 'importing attnlab imported triton'; "
        "assert 'attnlab.kernels.sigmoid.op' not in sys.modules; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    res = subprocess.run(
        [sys.executable, "-m", "attnlab", "list", "--json"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and json.loads(res.stdout)
