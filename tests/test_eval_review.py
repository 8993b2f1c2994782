"""attnlab eval's report, store and merge on hand-made results (no model), and step timing of a one-sample
run on the committed micro organism: benchmark speedups from the eval's device, newest stable run only;
no NaN in the markdown; no vacuous "keeps 95%" claim; a result stored once; parts merged by label and
length."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from attnlab.errors import AttnlabError
from attnlab.eval.report import bench_speedups, cheapest, markdown, points
from attnlab.eval.tasks import DENSE, EvalConfig, EvalResult, evaluate
from attnlab.organisms.checkpoint import organism_path
from attnlab.organisms.corpus import CorpusConfig

HAYSTACK = CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
N = 256
SW = "sliding_window(window=64)"


def acc_row(method: str, label: str, params: dict[str, Any], correct: int, samples: int = 10,
            length: int = N, task: str = "passkey") -> dict[str, Any]:  # fmt: skip
    return {"method": method, "label": label, "params": params, "task": task, "length": length,
            "samples": samples, "correct": correct, "accuracy": correct / samples if samples else math.nan,
            "outputs": [], "error": None}  # fmt: skip


def method_row(method: str, label: str, params: dict[str, Any], ms: float, family: str,
               length: int = N) -> dict[str, Any]:  # fmt: skip
    return {"method": method, "label": label, "params": params, "length": length, "family": family,
            "prefill_ms": ms, "decode_ms": 1.0, "prefill_density": 0.5 if family != "dense" else 1.0,
            "decode_density": 1.0, "error": None}  # fmt: skip


def result(dense_correct: int = 9, sw_samples: int = 10, info: dict[str, Any] | None = None) -> EvalResult:
    return EvalResult(
        [acc_row(DENSE, DENSE, {}, dense_correct), acc_row("sliding_window", SW, {"window": 64}, 9, sw_samples)],
        {"lengths": [N], "model": "m", "tasks": ["passkey"], "samples": 10, **(info or {})},
        [method_row(DENSE, DENSE, {}, 10.0, "dense"), method_row("sliding_window", SW, {"window": 64}, 8.0, "static")],
    )  # fmt: skip


def bench_run(root: Path, folder: str, device: str, device_type: str, rows: list[dict[str, Any]]) -> None:
    from attnlab.bench.store import ResultsDB

    base = {"method": "sliding_window", "backend": "flex", "params": json.dumps({"window": 64}),
            "pattern": "causal_self", "batch": 1, "heads": 4, "kv_heads": 4, "n_q": N, "n_k": N, "head_dim": 64,
            "dtype": "float32", "mode": "fwd", "status": "ok", "unstable": False}  # fmt: skip
    with ResultsDB(root / folder / "results.duckdb") as db:
        rid = db.new_run({"device": device, "device_type": device_type, "commit": "x"}, {})
        db.insert("efficiency", [{**base, **r} for r in rows], rid)
    time.sleep(0.01)  # (the next run starts later)


@pytest.mark.duckdb
def test_bench_speedups_take_the_newest_stable_row_of_the_eval_device(tmp_path: Path) -> None:
    """Old behaviour: the highest speedup of any run, device, shape or backend, unstable or not (9.0 from
    the GPU below for a CPU eval). Now: the eval's device only, the newest run that timed the key, its
    fastest stable backend; an older run's higher value is not taken."""
    root = tmp_path / "bench"
    bench_run(root, "cpu-old", "CPU x86_64 x2", "cpu", [{"speedup": 3.0}])  # older, faster: not taken
    bench_run(root, "h100", "NVIDIA H100", "cuda",
              [{"speedup": 9.0, "unstable": True, "dtype": "bfloat16", "heads": 32}])  # fmt: skip
    bench_run(root, "cpu", "CPU x86_64 x2", "cpu", [
        {"speedup": 5.0, "unstable": True, "heads": 8},  # flex unstable in the newest run: skipped
        {"speedup": 1.1, "backend": "sdpa_mask", "heads": 8},
    ])  # fmt: skip
    key = ("sliding_window", json.dumps({"window": 64}), N)
    cpu = bench_speedups(root, [N], "cpu")[key]
    assert (cpu["speedup"], cpu["backend"], cpu["device"], cpu["heads"]) == (
        1.1,
        "sdpa_mask",
        "CPU x86_64 x2",
        8,
    )
    gpu = bench_speedups(root, [N], "cuda", "NVIDIA H100")[key]
    assert gpu["unstable"] is True and gpu["speedup"] is None and gpu["device"] == "NVIDIA H100"
    assert bench_speedups(root, [N], "cuda", "NVIDIA A100") == {}
    # without a device: the newest run's device only (never a mix)
    assert bench_speedups(root, [N])[key]["device"] == "CPU x86_64 x2"
    res = result(info={"device": "cuda", "device_name": "NVIDIA H100"})
    md = markdown(res, points(res), {}, bench_speedups(root, [N], "cuda", "NVIDIA H100"))
    line = next(x for x in md.splitlines() if x.startswith("| sliding_window"))
    assert line.endswith("| unstable (flex) |")
    assert "on NVIDIA H100: bfloat16, B=1, H=32, H_kv=4, D=64" in md and "9.00x" not in md
    md = markdown(res, points(res), {}, {})
    assert "No benchmark row of this eval's device (NVIDIA H100)" in md


def test_markdown_prints_an_accuracy_without_samples_as_a_dash() -> None:
    res = result(sw_samples=0)
    md = markdown(res, points(res), {})
    line = next(x for x in md.splitlines() if x.startswith("| sliding_window"))
    assert "nan" not in md and line.startswith("| sliding_window(window=64) | prefill | - |")


def test_keeping_95_percent_of_a_dense_accuracy_of_0_is_not_determined() -> None:
    res = result(dense_correct=0)
    (c,) = cheapest(points(res))
    assert c["determined"] is False and c["cheapest"] is None and c["fastest"] is None and c["kept"] == 0
    md = markdown(res, points(res), {})
    line = next(x for x in md.splitlines() if x.startswith("| passkey@256"))
    assert "not determined (dense accuracy 0)" in line and SW not in line
    (c,) = cheapest(points(result()))
    assert c["determined"] is True and c["cheapest"]["label"] == SW


@pytest.mark.duckdb
def test_a_result_is_stored_once(tmp_path: Path) -> None:
    from attnlab.eval.store import EvalDB, store_result

    res = result(info={"commit": "abc"})
    with EvalDB(tmp_path / "e.duckdb") as db:
        first = store_result(db, res)
        assert store_result(db, EvalResult.read(res.write(tmp_path / "r.json"))) == first
        assert store_result(db, db.result(first)) == first  # (read back: carries its run id)
        other = store_result(db, result(info={"commit": "def"}))
        assert other != first
        assert len(db.runs()) == 2 and len(db.query("SELECT * FROM eval_accuracy")) == 4


def test_merge_keys_runs_by_label_and_length_and_refuses_other_perplexity_settings() -> None:
    info = {"lengths": [N, 2 * N], "model": "m", "perplexity_windows": 2, "decode_tokens": 16}
    a = EvalResult(
        [acc_row(DENSE, DENSE, {}, 9), acc_row("sliding_window", SW, {"window": 64}, 9)],
        info,
        [method_row(DENSE, DENSE, {}, 10.0, "dense"), method_row("sliding_window", SW, {"window": 64}, 8.0, "static")],
    )  # fmt: skip
    b = EvalResult(
        [acc_row(DENSE, DENSE, {}, 9, length=2 * N), acc_row("sliding_window", SW, {"window": 64}, 7, length=2 * N)],
        info,
        [method_row(DENSE, DENSE, {}, 10.0, "dense", 2 * N),
         method_row("sliding_window", SW, {"window": 64}, 8.0, "static", 2 * N)],
    )  # fmt: skip
    merged = EvalResult.merge([a, b])  # the same label at another length: no duplicate
    assert sorted((m["label"], m["length"]) for m in merged.methods if m["method"] != DENSE) == [
        (SW, N),
        (SW, 2 * N),
    ]
    with pytest.raises(AttnlabError, match=f"runs {re_escape(SW)}@{N} again"):
        EvalResult.merge([a, a])
    for key, value in (("perplexity_windows", 4), ("decode_tokens", 8)):
        other = EvalResult(b.rows, {**b.info, key: value}, b.methods)
        with pytest.raises(AttnlabError, match=f"differs from part 0 in .*'{key}': {value}"):
            EvalResult.merge([a, other])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_one_sample_run_is_timed() -> None:
    """With one sample per run (the run's first, which compiles, and its only one) the step times are
    measured from it instead of being left empty."""
    cfg = EvalConfig(model=organism_path("micro"), tasks=("passkey",), lengths=(N,), samples=1, corpus=HAYSTACK,
                     perplexity=0)  # fmt: skip
    (m,) = evaluate(cfg).methods
    assert m["timed_prefills"] == 1 and m["prefill_ms"] is not None and m["prefill_ms"] > 0
    assert m["timed_steps"] >= 1 and m["decode_ms"] is not None
