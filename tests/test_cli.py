"""The attnlab command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import attnlab
from attnlab import cli
from attnlab.cli import app
from attnlab.support import readme_block
from attnlab.testing import on_cuda

runner = CliRunner()


def test_list_table_json_and_markdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300))  # no wrapping inside the table's cells
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "sliding_window" in res.output
    assert "self, causal, cross, causal-cross" in res.output  # the README's order, not set order
    res = runner.invoke(app, ["list", "--json"])
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list(attnlab.methods())
    assert rows[0]["patterns"] == ["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"]
    res = runner.invoke(app, ["list", "--markdown"])
    assert res.output.strip() == readme_block()


#: `verify --device cpu` runs Triton kernels in the interpreter and sets TRITON_INTERPRET=1 in its process for
#: that: on a GPU machine that would make every later test of the worker interpret its kernels, and the GPU
#: machine's interpreter (Triton 3.6 with its numpy) fails ("only 0-dimensional arrays can be converted to
#: Python scalars"); `verify --device cuda` of a method takes minutes. These run on CPU machines (CI).
cpu_verify = pytest.mark.skipif(
    on_cuda(), reason="verify on the CPU interprets Triton kernels: CPU machines only"
)


@cpu_verify
def test_verify_a_method_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # (restored after)
    res = runner.invoke(app, ["verify", "--device", "cpu", "--methods", "sliding_window"])
    assert res.exit_code == 0, res.output
    assert "passed, 0 failed" in res.output


@cpu_verify
def test_verify_in_worker_processes_gives_the_serial_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # (restored after)
    out = tmp_path / "v.jsonl"
    args = ["verify", "--device", "cpu", "--methods", "streaming,softmax", "--jobs", "2"]
    args += ["--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    first, *lines = out.read_text().splitlines()
    env = json.loads(first)["environment"]  # which code ran: commit and dirty flag, recorded by verify
    assert env["commit"] and isinstance(env["dirty"], bool) and env["device_type"] == "cpu"
    parallel = [json.loads(line) for line in lines]
    from attnlab.verify import verify

    serial = verify(torch.device("cpu"), ("streaming", "softmax"))
    key = lambda r: (r["method"], r["backend"], r["case"])
    assert sorted(map(key, parallel)) == sorted((c.method, c.backend, c.case.label()) for c in serial)
    assert all(r["passed"] or r["skipped"] for r in parallel) and len(parallel) == len(serial) > 4


@pytest.mark.duckdb
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


@pytest.mark.parametrize("width", [200, 80])
def test_bench_help_shows_the_defaults(width: int) -> None:
    """Also at a terminal's 80 columns, where a list without spaces was cut off."""
    res = runner.invoke(app, ["bench", "--help"], terminal_width=width)
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    for default in (
        "512, 1024, 2048 on CPU",
        "4096, 8192, 16384, 32768, 65536 on CUDA",
        "float32 on CPU",
        "first on CPU",
    ):
        assert default in text, default


def test_notes_keep_their_brackets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The install hint "pip install 'attnlab[minilm]'" must not lose "[minilm]" to rich markup."""
    from attnlab.bench import workloads

    def unavailable(name: str, *args: object, **kw: object) -> workloads.Workload:
        raise workloads.WorkloadUnavailable(
            "the minilm workload needs the optional extra: pip install 'attnlab[minilm]'"
        )

    monkeypatch.setattr(workloads, "load", unavailable)
    args = ["bench", "--device", "cpu", "--no-efficiency", "--workloads", "minilm", "--out", str(tmp_path)]
    monkeypatch.setattr(cli, "console", Console(width=300))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "pip install 'attnlab[minilm]'" in res.output


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


def test_train_takes_an_attention_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--attention: one method for every layer or one per layer, with --attention-params; bad plans exit 2
    naming what is wrong (the run itself is stubbed: the plan is what is under test)."""
    import attnlab.organisms.train as train_mod

    seen = []

    def fake_train(cfg, out, **kw):  # type: ignore[no-untyped-def]
        seen.append(cfg)
        raise train_mod.ConfigError("stub: stop before training")

    monkeypatch.setattr(train_mod, "train", fake_train)
    runner.invoke(app, ["train", "--out", str(tmp_path), "--attention", "gated_delta"])
    layers = seen[-1].model.layers
    assert seen[-1].model.attention == ("gated_delta",) * layers
    plan = ",".join(["softmax"] + ["sliding_window"] * (layers - 1))
    runner.invoke(app, ["train", "--out", str(tmp_path), "--attention", plan,
                        "--attention-params", '{"sliding_window": {"window": 64}}'])  # fmt: skip
    assert (
        seen[-1].model.attention[0] == "softmax"
        and seen[-1].model.attention_params["sliding_window"]["window"] == 64
    )
    bad = runner.invoke(app, ["train", "--out", str(tmp_path), "--attention", "softmax,softmax_typo"])
    assert bad.exit_code == 2 and "softmax_typo" in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modes", "bwd"], "modes=bwd"),
        (["--budgets", "al"], "budgets='al'"),
        (["--workloads", "organisms"], "workloads=organisms"),
        (["--lengths", "12x"], "12x"),
        (["--lengths", "0"], "positive token counts"),
        (["--dtype", "fp16"], "dtype='fp16'"),
        (["--kv-heads", "3"], "kv_heads=3"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bench_refuses_bad_options_before_a_run_opens(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad option values exit with a usage error naming them, and no run is written."""
    out = tmp_path / "r"
    res = runner.invoke(app, ["bench", "--device", "cpu", "--out", str(out), *args], terminal_width=200)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists() or not any(out.iterdir())


def test_verify_refuses_an_unknown_method() -> None:
    """A misspelled method is an error with a suggestion, not a run of zero checks that passes."""
    res = runner.invoke(app, ["verify", "--methods", "softmx", "--device", "cpu"])
    assert res.exit_code != 0
    assert "Did you mean 'softmax'" in str(res.exception)
