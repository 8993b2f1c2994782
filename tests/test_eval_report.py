"""attnlab eval's measurements beyond accuracy, on the committed micro organism: densities, the two-phase
perplexity (checked against the model's own full-window loss), decode methods through attnlab.hf's
decode routing, tight budgets, the DuckDB store, the Pareto report and the CLI's --load path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("duckdb", reason="the evaluation database needs duckdb, which is not installed here")
import torch

import attnlab
from attnlab.errors import AttnlabError
from attnlab.eval.density import decode_density, prefill_density, tidal_roles
from attnlab.eval.perplexity import phase_loss, ppl_change, windows, with_ppl_changes
from attnlab.eval.report import cheapest, pareto, points, write_report
from attnlab.eval.store import EvalDB, store_result
from attnlab.eval.tasks import (
    DENSE,
    EvalConfig,
    EvalResult,
    MethodRun,
    evaluate,
    method_runs,
    runnable_methods,
)
from attnlab.organisms.checkpoint import load_organism, organism_path
from attnlab.organisms.corpus import CorpusConfig

HAYSTACK = CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
LENGTH = 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def result() -> EvalResult:
    cfg = EvalConfig(
        model=organism_path("micro"),
        # a static method, a decode method at its default (4096 >= 256: exact) and tight budget, tidal
        methods=("streaming:window=32:sinks=4", "page_topk", "tidal:budget=32"),
        tasks=("passkey",),
        lengths=(LENGTH,),
        samples=2,
        corpus=HAYSTACK,
        budgets="default+tight",
        perplexity=1,
        decode_tokens=4,
    )
    return evaluate(cfg)


def test_tidal_roles_and_decode_density() -> None:
    assert tidal_roles(2) == {0: "select", 1: "reuse"}
    assert tidal_roles(6) == {0: "full", 1: "select", 2: "reuse", 3: "reuse", 4: "reuse", 5: "reuse"}
    with pytest.raises(ValueError, match="num_layers=0"):
        tidal_roles(0)
    page = attnlab.get("page_topk")
    assert decode_density(page, {"budget": 4096}, 1024, 2, 2, CPU) == 1.0  # budget >= keys: exact
    assert decode_density(page, {"budget": 256}, 1024, 2, 2, CPU) == 0.25
    ret = attnlab.get("retrieval_heads_kv")
    assert decode_density(ret, {"heads": (0,), "budget": 256}, 1024, 2, 2, CPU) == (1 + 0.25) / 2
    tidal = attnlab.get("tidal")
    assert decode_density(tidal, {"budget": 256}, 1024, 6, 1, CPU) == (2 + 4 * 0.25) / 6
    # prefill-only and dense methods: 1.0 in the phase they do not change
    assert decode_density(attnlab.get("block_topk"), {}, 1024, 2, 2, CPU) == 1.0
    assert prefill_density(page, {"budget": 256}, 1024, None, CPU) == 1.0
    # a per-head mask no static plan expresses: not counted (NaN), not taken for dense
    strided = attnlab.get("strided_heads")
    assert math.isnan(prefill_density(strided, {}, 1024, None, CPU))
    assert math.isnan(decode_density(strided, {}, 1024, 2, 2, CPU))


def test_prefill_density_static_and_dynamic() -> None:
    stream = attnlab.get("streaming")
    d = prefill_density(stream, {"sinks": 4, "window": 64}, 512, None, CPU)
    # the share of causal pairs a window of 64 plus 4 sinks keeps, counted directly
    q = torch.arange(512)[:, None]
    k = torch.arange(512)[None, :]
    keep = (k <= q) & ((q - k < 64) | (k < 4))
    assert d == pytest.approx(float(keep.sum()) / float((k <= q).sum()))
    topk = attnlab.get("block_topk")
    with pytest.raises(ValueError, match="captured Q/K are needed"):
        prefill_density(topk, {}, 512, None, CPU)
    g = torch.Generator().manual_seed(0)
    qk = [(torch.randn(1, 2, 512, 16, generator=g), torch.randn(1, 1, 512, 16, generator=g), 0.25)]
    small = prefill_density(topk, {"block": 64, "topk": 2}, 512, qk, CPU)
    assert 0 < small < prefill_density(topk, {"block": 64, "topk": 6}, 512, qk, CPU) <= 1.0


def test_phase_loss_equals_the_models_full_window_loss() -> None:
    model, tok = load_organism(organism_path("micro"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tok.vocab_size, (2 * 65,), generator=g).tolist()
    wins = windows(ids, 64, 3)
    assert len(wins) == 2 and all(len(w) == 65 for w in wins)  # a third window does not fit
    loss = phase_loss(model, wins, decode_tokens=8)
    assert (loss.prefill_tokens, loss.decode_tokens) == (2 * 56, 2 * 8)
    with torch.no_grad():
        x = torch.tensor(wins)
        logits = model(input_ids=x[:, :-1]).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    assert loss.prefill_loss == pytest.approx(float(ce[:, :56].mean()), rel=1e-4)
    assert loss.decode_loss == pytest.approx(float(ce[:, 56:].mean()), rel=1e-4)
    with pytest.raises(ValueError, match="decode_tokens=64"):
        phase_loss(model, wins, decode_tokens=64)
    assert ppl_change(2.0, 2.0) == 0.0 and ppl_change(None, 1.0) is None
    assert ppl_change(math.log(2.2), math.log(2.0)) == pytest.approx(0.1)


def test_runs_and_decode_routing(result: EvalResult) -> None:
    runs = {m["label"]: m for m in result.methods}
    assert next(iter(runs)) == DENSE and all(m["error"] is None for m in runs.values())
    assert set(runs) == {
        DENSE,
        "streaming(sinks=4, window=32)",
        "page_topk",
        f"page_topk(budget={LENGTH // 8})",
        "tidal(budget=32)",
    }
    dense = runs[DENSE]
    for label in ("page_topk", f"page_topk(budget={LENGTH // 8})", "tidal(budget=32)"):
        m = runs[label]
        assert (m["prefill"], m["decode"], m["family"]) == (DENSE, label.split("(")[0], "decode")
        assert m["prefill_loss"] == dense["prefill_loss"]  # prefill ran softmax: the same computation
        assert m["prefill_density"] == 1.0
    # the default budget (4096) covers every key: exact attention in decode
    assert runs["page_topk"]["decode_density"] == 1.0
    assert runs["page_topk"]["decode_loss"] == pytest.approx(dense["decode_loss"], rel=1e-5)
    assert runs[f"page_topk(budget={LENGTH // 8})"]["decode_density"] == pytest.approx(1 / 8)
    assert runs[f"page_topk(budget={LENGTH // 8})"]["budget"] == "tight"
    assert runs["tidal(budget=32)"]["decode_density"] == pytest.approx((1 + 32 / LENGTH) / 2)
    stream = runs["streaming(sinks=4, window=32)"]
    assert stream["prefill"] == stream["decode"] == "streaming" and stream["prefill_density"] < 0.5
    rows = {r["label"]: r for r in result.rows}
    assert rows["page_topk"]["outputs"] == rows[DENSE]["outputs"]
    for m in runs.values():
        assert m["timed_prefills"] == (0 if m["shared_prefill"] else 1) and m["ppl_decode_tokens"] == 4
        assert m["shared_prefill"] == (m["family"] == "decode") and m["decode_ms"] > 0


def test_shared_prefill_equals_a_fresh_prefill(result: EvalResult) -> None:
    tight = f"page_topk(budget={LENGTH // 8})"
    shared = next(m for m in result.methods if m["label"] == tight)
    assert shared["shared_prefill"] and shared["timed_prefills"] == 0 and shared["prefill_ms"] is None
    cfg = EvalConfig(
        model=organism_path("micro"),
        methods=(f"page_topk:budget={LENGTH // 8}",),
        tasks=("passkey",),
        lengths=(LENGTH,),
        samples=2,
        corpus=HAYSTACK,
        perplexity=1,
        decode_tokens=4,
        share_prefill=False,
    )
    fresh = evaluate(cfg)
    m = next(m for m in fresh.methods if m["label"] == tight)
    assert not m["shared_prefill"] and m["timed_prefills"] == 1
    assert m["decode_loss"] == pytest.approx(shared["decode_loss"], rel=1e-6)
    assert m["prefill_loss"] == pytest.approx(shared["prefill_loss"], rel=1e-6)
    outs = {r["label"]: r["outputs"] for r in result.rows}
    assert [r["outputs"] for r in fresh.rows if r["label"] == tight] == [outs[tight]]


def test_use_kwargs_tidal_roles() -> None:
    run = MethodRun("tidal", DENSE, "tidal", (("budget", 64),))
    kw = run.use_kwargs("cuda", num_layers=2)
    assert kw["plan"]["layers"] == {
        0: {"decode": {"method": "tidal", "params": {"budget": 64, "role": "select"}}},
        1: {"decode": {"method": "tidal", "params": {"budget": 64, "role": "reuse"}}},
    }
    with pytest.raises(ValueError, match="number of layers"):
        run.use_kwargs("cuda")


def test_runnable_methods_and_budget_modes() -> None:
    names = runnable_methods()
    specs = attnlab.methods()
    assert DENSE not in names and all(specs[n].family != "linear" for n in names)
    assert "page_topk" in names and "tidal" in names and "block_topk" in names
    dense_at = [i for i, n in enumerate(names) if specs[n].family == "dense"]
    assert dense_at == list(range(len(names) - len(dense_at), len(names)))  # dense variants last
    runs = method_runs(["page_topk"], 1024, budgets="default")
    assert [r.label for r in runs] == [DENSE, "page_topk"]
    # a density that prefers the larger candidate is obeyed; one above the default gives no tight run
    pick = method_runs(["page_topk"], 1024, "default+tight", lambda n, p: p.get("budget", 4096) / 4096 - 0.5)
    assert pick[-1].label == "page_topk(budget=128)"
    none = method_runs(["page_topk"], 1024, "default+tight", lambda n, p: 1.0 if p else 0.5)
    assert [r.label for r in none] == [DENSE, "page_topk"]
    with pytest.raises(ValueError, match="budgets='some'"):
        method_runs(["page_topk"], 1024, budgets="some")


def test_time_limits(tmp_path: Path) -> None:
    cfg = EvalConfig(
        model=organism_path("micro"),
        methods=("streaming:window=32:sinks=4",),
        tasks=("passkey",),
        lengths=(LENGTH,),
        samples=1,
        corpus=HAYSTACK,
        max_seconds=0.0,
    )
    res = evaluate(cfg)
    assert res.rows == [] and res.info["skipped"] == [
        f"{DENSE}@{LENGTH}",
        f"streaming(sinks=4, window=32)@{LENGTH}",
    ]
    cfg.max_seconds, cfg.run_seconds, cfg.methods, cfg.samples = None, 1e-3, (), 4
    res = evaluate(cfg)
    # the alarm fires 1 ms in; Python runs its handler at the next bytecode, so a sample that was in a long
    # C call may still finish (CI at bded78d counted one): the run stops well before its 4 samples
    assert "RunTimeout" in res.methods[0]["error"] and res.rows[0]["samples"] < 4


def test_store_report_and_pareto(result: EvalResult, tmp_path: Path) -> None:
    with EvalDB(tmp_path / "eval.duckdb") as db:
        rid = store_result(db, result, notes=["a note"])
        back = db.result(rid)
        notes = db.query("SELECT note FROM notes WHERE run_id = ?", [rid])
    assert [r["label"] for r in back.rows] == [r["label"] for r in result.rows]
    assert [r["outputs"] for r in back.rows] == [r["outputs"] for r in result.rows]
    changes = {m["label"]: m for m in with_ppl_changes(result.methods)}
    for m in back.methods:
        assert m["decode_ppl_change"] == pytest.approx(changes[m["label"]]["decode_ppl_change"])
        assert m["params"] == dict(next(x for x in result.methods if x["label"] == m["label"])["params"])
    assert changes[DENSE]["prefill_ppl_change"] == 0.0 and notes == [{"note": "a note"}]
    path = write_report(result, tmp_path / "report")
    text = path.read_text()
    assert "## Cheapest run keeping >= 95% of dense accuracy" in text and "page_topk(budget=32)" in text
    assert (tmp_path / "report" / f"pareto-passkey-{LENGTH}.png").stat().st_size > 1000
    assert "<table>" in (tmp_path / "report" / "report.html").read_text()


def test_pareto_and_cheapest_by_hand() -> None:
    def p(
        label: str, acc: float, density: float, speedup: float, family: str = "static"
    ) -> dict[str, object]:
        return {"label": label, "method": label, "task": "t", "length": 8, "accuracy": acc, "density": density,
                "speedup": speedup, "family": family, "error": None}  # fmt: skip

    pts = [
        p(DENSE, 1.0, 1.0, 1.0, "dense"),
        p("a", 1.0, 0.5, 0.8),
        p("b", 0.9, 0.2, 2.0),
        p("c", 0.8, 0.3, 1.5),
    ]
    assert [q["label"] for q in pareto(pts, "density")] == ["b", "a"]  # c is dominated by b; dense by a
    # by speed, dense (as accurate as a, and faster) dominates a
    assert [q["label"] for q in pareto(pts, "speedup", higher_is_cheaper=True)] == ["b", DENSE]
    (c,) = cheapest(pts, keep=0.95)
    assert c["cheapest"]["label"] == "a" and c["fastest"]["label"] == "a" and (c["kept"], c["runs"]) == (1, 3)
    (c,) = cheapest(pts, keep=0.85)
    assert c["cheapest"]["label"] == "b" and c["fastest"]["label"] == "b"


def test_cli_load(result: EvalResult, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from attnlab.cli import app

    src = result.write(tmp_path / "gpu.json")
    args = ["eval", "--load", str(src), "--db", str(tmp_path / "e.duckdb"), "--report", str(tmp_path / "r")]
    out = CliRunner().invoke(app, [*args, "--commit", "abc1234"])
    assert out.exit_code == 0, out.output
    with EvalDB(tmp_path / "e.duckdb", read_only=True) as db:
        (run,) = db.runs()
        assert run["commit"] == "abc1234" and json.loads(run["config"])["kind"] == "eval"
    assert "commit abc1234" in (tmp_path / "r" / "report.md").read_text()
    assert points(EvalResult.read(src))[0]["label"] == DENSE
    bad = CliRunner().invoke(app, ["eval", "--load", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "no eval result file" in bad.output


def test_merge_joins_the_parts_of_one_evaluation(result: EvalResult, tmp_path: Path) -> None:
    """Two parts of one evaluation (each ran softmax and other methods) merge into one result: softmax's
    rows once, every other run once, a run left out by one part's time limit but run by the other no
    longer listed; parts that differ in what they evaluated, or run the same method twice, are refused."""
    from typer.testing import CliRunner

    from attnlab.cli import app

    streaming = {m["label"] for m in result.methods if m["method"] == "streaming"}
    a = EvalResult([r for r in result.rows if r["method"] != "page_topk" and r["method"] != "tidal"],
                   {**result.info, "skipped": [f"{next(iter(streaming))}@9"]},
                   [m for m in result.methods if m["method"] not in ("page_topk", "tidal")])  # fmt: skip
    b = EvalResult([r for r in result.rows if r["method"] in (DENSE, "page_topk", "tidal")],
                   {**result.info, "skipped": ["page_topk@512"]},
                   [m for m in result.methods if m["method"] in (DENSE, "page_topk", "tidal")])  # fmt: skip
    merged = EvalResult.merge([a, b])
    key = [(r["label"], r["task"], r["length"]) for r in merged.rows]
    assert sorted(key) == sorted((r["label"], r["task"], r["length"]) for r in result.rows)
    assert len(merged.methods) == len(result.methods)
    assert merged.info["skipped"] == [f"{next(iter(streaming))}@9", "page_topk@512"]
    assert (
        merged.info["parts"] == 2 and merged.info["softmax_per_part"][0] == merged.info["softmax_per_part"][1]
    )
    with pytest.raises(AttnlabError, match="runs .*again"):
        EvalResult.merge([a, a])
    assert merged.info["softmax_parts_agree"] is True
    for key, value in (("samples", 3), ("lengths", [LENGTH, 2 * LENGTH]), ("commit", "0000000")):
        with pytest.raises(AttnlabError, match=f"differs from part 0 in .*{key}"):
            EvalResult.merge([a, EvalResult(b.rows, {**b.info, key: value}, b.methods)])
    files = [str(a.write(tmp_path / "a.json")), str(b.write(tmp_path / "b.json"))]
    out = CliRunner().invoke(app, ["eval", "--load", files[0], "--load", files[1], "--no-db", "--report",
                                   str(tmp_path / "r")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "page_topk" in (tmp_path / "r" / "report.md").read_text()


def test_small_card_states_the_committed_eval_figures() -> None:
    """The small organism's card table is the committed H100 evaluation (two parts of one run, merged), and
    that run covers every method that can run in a model."""
    from attnlab.eval.report import card_table

    folder = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-2026-11-23-s6/eval"
    merged = EvalResult.merge([EvalResult.read(folder / f"eval-{p}.json") for p in ("prefill", "rest")])
    table = card_table([("H100", merged)], 8192)
    assert table in (organism_path("small") / "README.md").read_text()
    assert {m["method"] for m in merged.methods} == {DENSE, *runnable_methods()}
    assert merged.info["commit"] == "b335583" and not merged.info["skipped"]


def test_bench_speedups_pair_with_eval_rows(result: EvalResult, tmp_path: Path) -> None:
    from attnlab.bench.store import ResultsDB
    from attnlab.eval.report import bench_speedups

    row = {"method": "streaming", "params": json.dumps({"sinks": 4, "window": 32}, sort_keys=True),
           "pattern": "causal_self", "mode": "fwd", "n_q": LENGTH, "n_k": LENGTH, "backend": "flex",
           "speedup": 1.7, "heads": 8, "head_dim": 64, "dtype": "bfloat16", "status": "ok"}  # fmt: skip
    with ResultsDB(tmp_path / "bench" / "results.duckdb") as db:
        rid = db.new_run({"device": "CPU test", "device_type": "cpu"}, {})  # (the eval ran on a CPU)
        db.insert("efficiency", [row, {**row, "backend": "sdpa_mask", "speedup": 0.4}], run_id=rid)
        db.insert("efficiency", [{**row, "mode": "fwd_bwd", "speedup": 9.0}], run_id=rid)
    pairs = bench_speedups(tmp_path / "bench", [LENGTH])
    key = ("streaming", json.dumps({"sinks": 4, "window": 32}, sort_keys=True), LENGTH)
    assert list(pairs) == [key] and pairs[key]["speedup"] == 1.7 and pairs[key]["backend"] == "flex"
    text = write_report(result, tmp_path / "r", bench_root=tmp_path / "bench", plots=False).read_text()
    assert "bench attn speedup@256" in text and "1.70x (flex)" in text
