"""benchmarks/timed_check.py: the last-rows check against the reference passes a right backend, fails a wrong one."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.testing import device_under_test

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("timed_check", ROOT / "benchmarks" / "timed_check.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("causal", [True, False])
def test_last_rows_check_passes_the_backend_and_catches_a_wrong_one(
    causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    good = mod.check_one("sliding_window", "sdpa_mask", {"window": 8}, causal, q, k, v, rows=12)
    assert good["passed"] and set(good["errors"]) == {"out", "dq", "dk", "dv"}
    assert good["ran"] == "sdpa_mask"
    spec = attnlab.get("sliding_window")
    real = spec.reference

    def wider(q, k, v, params, **kw):  # type: ignore[no-untyped-def]
        return real(q, k, v, spec.make_params({"window": 9}), **kw)

    monkeypatch.setattr(mod.attnlab, "get", lambda name: dataclasses.replace(spec, reference=wider))
    bad = mod.check_one("sliding_window", "sdpa_mask", {"window": 8}, causal, q, k, v, rows=12)
    assert not bad["passed"] and bad["errors"]["out"]["err"] > bad["errors"]["out"]["bound"]


def test_rows_skip_reasons_use_the_pattern_of_the_row() -> None:
    """A non-causal row needs the non-causal cross pattern (its reference), a causal row the causal one;
    dynamic and linear methods are checked on the whole call (their own pattern only); decode selection and
    a dynamic method without an estimator are skipped."""
    from attnlab.patterns import Pattern

    mod = _module()
    spec = attnlab.get("sliding_window")
    causal_only_cross = dataclasses.replace(
        spec, patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_CROSS})
    )
    assert mod.skip_reason(causal_only_cross, True) == ""
    assert "no noncausal_cross pattern" in mod.skip_reason(causal_only_cross, False)
    noncausal_only_cross = dataclasses.replace(
        spec, patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    )
    assert mod.skip_reason(noncausal_only_cross, False) == ""
    assert "no causal_cross pattern" in mod.skip_reason(noncausal_only_cross, True)
    assert mod.skip_reason(attnlab.get("block_topk"), True) == mod.skip_reason(attnlab.get("gla"), True) == ""
    assert (mod.kind_of(attnlab.get("block_topk")), mod.kind_of(attnlab.get("gla"))) == (
        "planned",
        "stateful",
    )
    assert "no noncausal_self pattern" in mod.skip_reason(attnlab.get("vertical_slash"), False)
    assert "stateful" in mod.skip_reason(attnlab.get("page_topk"), True)
    assert "without an estimator" in mod.skip_reason(attnlab.get("nsa"), True)
    assert mod.skip_reason(attnlab.get("alibi"), False) == ""  # optional inputs only: checked


def test_every_budget_and_both_paths_are_checked_with_the_backend_each_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sliding_window: each budget the bench times, inference and training. alibi (optional inputs only,
    checked without them as the bench times it), its backends replaced by a forward-only eager copy and the
    eager one: dispatch runs the copy for inference and eager with gradients (on the GPU: its Triton
    kernel, then Flex), and each result names the backend of its own path."""
    from attnlab import registry

    mod = _module()
    torch.manual_seed(0)
    quiet = lambda *a: None
    q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
    res = mod.check_method("sliding_window", True, q, k, v, 8, backends=("sdpa_mask",), log=quiet)
    budgets = attnlab.get("sliding_window").bench_params(1024)
    assert len({json_key(p) for p in budgets}) == len(budgets) >= 2 and len(res) == 2 * len(budgets)
    assert sorted((json_key(r["params"]), r["path"]) for r in res) == sorted(
        (json_key(p), path) for p in budgets for path in ("fwd", "fwd_bwd")
    )
    assert all(r["passed"] and r["ran"] == "sdpa_mask" for r in res)
    assert {frozenset(r["errors"]) for r in res} == {frozenset({"out"}), frozenset({"out", "dq", "dk", "dv"})}

    q, k, v = (
        t[:, :, :128] for t in (q, k, v)
    )  # a budget listed twice (sliding_window at 128): checked once
    unique = {json_key(p) for p in attnlab.get("sliding_window").bench_params(128)}
    assert len(
        mod.check_method("sliding_window", True, q, k, v, 8, backends=("sdpa_mask",), log=quiet)
    ) == 2 * len(unique)

    alibi = attnlab.get("alibi")
    eager = alibi.backend("eager")
    fwd_only = type(eager)()
    fwd_only.name, fwd_only.caps = "eager_fwd", dataclasses.replace(eager.caps, backward=False)
    fake = dataclasses.replace(alibi, backends=(fwd_only, eager), training_backends=())
    monkeypatch.setitem(registry._REGISTRY, "alibi", fake)
    res = mod.check_method("alibi", False, q, k, v, 8, backends=("default",), log=quiet)
    assert all(r["passed"] for r in res), res
    assert {r["path"]: r["ran"] for r in res} == {"fwd": "eager_fwd", "fwd_bwd": "eager"}


def json_key(params: dict) -> str:
    import json

    return json.dumps(params, sort_keys=True)


def test_required_inputs_are_given_and_cut_to_the_last_rows() -> None:
    """lowrank_bias requires u (B, H, N_q, R) and vf (B, H, N_k, R): drawn as the bench draws them; the
    reference of the last rows gets u's last rows."""
    mod = _module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    res = mod.check_method("lowrank_bias", True, q, k, v, 8, backends=("eager",), log=lambda *a: None)
    assert [r["path"] for r in res] == ["fwd", "fwd_bwd"] and all(r["passed"] for r in res), res
    spec = attnlab.get("lowrank_bias")
    from attnlab.bench.calls import required_inputs

    extra = required_inputs("lowrank_bias", q, k, v)
    cut = mod.reference_inputs(spec, extra, 8)
    assert torch.equal(cut["u"], extra["u"][:, :, -8:]) and torch.equal(cut["vf"], extra["vf"])


def test_cpu_smoke_writes_checks_and_skips(tmp_path: Path) -> None:
    mod = _module()
    out = tmp_path / "tc.json"
    report = mod.main(
        ["--device", "cpu", "--n", "96", "--heads", "2", "--head-dim", "16", "--dtype", "float32", "--rows",
         "8", "--methods", "softmax,block_topk,neighborhood", "--backends", "default,sdpa", "--out", str(out)]
    )  # fmt: skip
    # block_topk (dynamic) is checked too: its default choice, against softmax over its executed plan
    assert report["summary"] == {"checked": 12, "passed": 12, "failed": 0, "skipped": 2}
    # the file is rewritten after each method (a run cut short keeps what it checked); this one finished
    assert report["complete"] and report["methods_done"] == ["softmax", "block_topk", "neighborhood"]
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert {r["kind"] for r in report["results"] if r["method"] == "block_topk"} == {"planned"}
    skipped = {(r["method"], r["causal"]): r["skipped"] for r in report["results"] if "skipped" in r}
    assert set(skipped) == {("neighborhood", c) for c in (True, False)}
    assert (
        "noncausal_cross" in skipped[("neighborhood", False)]
        and "causal_cross" in skipped[("neighborhood", True)]
    )
    assert out.exists() and report["env"]["device"]


# -- dynamic sparse and stateful linear methods: the whole call ---------------------------------------------
def test_dynamic_check_uses_the_executed_plan_and_catches_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """block_topk (small tiles, so the plan bites) on the executor and sdpa_mask passes against softmax over
    the plan the call returned; a call whose returned plan is not the one it ran (another top-k) fails."""
    from attnlab.core import Result

    mod = _module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 16, device=device_under_test()) for _ in range(3))
    params = {"block": 16, "topk": 2}
    for backend in ("block_sparse", "sdpa_mask"):
        for causal in (True, False):
            r = mod.check_one("block_topk", backend, params, causal, q, k, v, rows=20)
            assert r["passed"] and r["ran"] == backend and r["kind"] == "planned", r
            assert set(r["errors"]) == {"out", "dq", "dk", "dv"}
    real = mod.attnlab.attention

    def other_plan(*args, **kw):  # type: ignore[no-untyped-def]
        res = real(*args, **kw)
        wider = real(*args, **{**kw, "topk": 4})
        return Result(res.out, plan=wider.plan)

    monkeypatch.setattr(mod.attnlab, "attention", other_plan)
    bad = mod.check_one("block_topk", "sdpa_mask", params, True, q, k, v, rows=20, grad=False)
    assert not bad["passed"] and bad["errors"]["out"]["err"] > bad["errors"]["out"]["bound"]


@pytest.mark.parametrize(("n", "rows", "block"), [(80, 20, 16), (75, 7, 16), (64, 64, 32)])
def test_plan_rows_mask_is_the_last_rows_of_the_dense_mask(n: int, rows: int, block: int) -> None:
    """The cut plan's mask (mask_mod shifted, token columns kept) equals the whole plan's dense mask on its
    last rows: block_topk's causal rule and vertical_slash's columns, self and cross (N_q < N_k)."""
    from attnlab.bench.planning import estimated_plan

    mod = _module()
    torch.manual_seed(0)
    for method, params, n_k in (("block_topk", {"block": block, "topk": 2}, n), ("block_topk", {"block": block, "topk": 2}, n + 9),
                                ("vertical_slash", {"vertical": 5, "slash": 7, "sink_columns": 1, "local_diagonals": 1, "block": block}, n)):  # fmt: skip
        spec = attnlab.get(method)
        q, k = torch.randn(1, 2, n, 16), torch.randn(1, 2, n_k, 16)
        plan = estimated_plan(spec, params, q, k, True)
        assert (plan.columns is not None) == (method == "vertical_slash")  # the column path is exercised
        assert torch.equal(mod.plan_rows_mask(plan, rows), plan.dense_mask()[:, :, -rows:]), (method, n_k)


def test_plan_reason_accepts_softmax_over_the_plan_and_refuses_another_reference() -> None:
    mod = _module()
    spec = attnlab.get("block_topk")
    assert mod.plan_reason(spec, {"block": 16, "topk": 2}, True, torch.device("cpu")) == ""
    real = spec.reference

    def sharper(q, k, v, params, *, scale, **kw):  # type: ignore[no-untyped-def]
        return real(q, k, v, params, scale=2 * scale, **kw)

    assert "not softmax over its estimated plan" in mod.plan_reason(
        dataclasses.replace(spec, reference=sharper), {"block": 16, "topk": 2}, True, torch.device("cpu")
    )


def test_stateful_check_compares_output_and_state_and_guards_the_reference_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gla (its gate drawn as the bench draws it) on torch_chunk: output, final state and gradients pass;
    a wrong final state fails; a reference graph over the limit skips the training path with the reason."""
    from attnlab.bench.calls import required_inputs
    from attnlab.core import Result

    mod = _module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    extra = required_inputs("gla", q, k, v)
    good = mod.check_one("gla", "torch_chunk", {}, True, q, k, v, rows=8, inputs=extra)
    assert good["passed"] and good["kind"] == "stateful", good
    assert set(good["errors"]) == {"out", "state", "dq", "dk", "dv"}
    with pytest.raises(mod.Skip, match="ref-graph-gb"):
        mod.check_one("gla", "torch_chunk", {}, True, q, k, v, rows=8, inputs=extra, ref_graph_gb=1e-9)
    res = mod.check_method("gla", True, q, k, v, 8, backends=("torch_chunk",), log=lambda *a: None,
                           ref_graph_gb=1e-9)  # fmt: skip
    assert [("skipped" in r, r.get("passed")) for r in res] == [(False, True), (True, None)], res
    real = mod.attnlab.attention

    def drifting_state(*args, **kw):  # type: ignore[no-untyped-def]
        r = real(*args, **kw)
        return Result(r.out, state=r.state * 1.01)

    monkeypatch.setattr(mod.attnlab, "attention", drifting_state)
    bad = mod.check_one("gla", "torch_chunk", {}, True, q, k, v, rows=8, grad=False, inputs=extra)
    assert not bad["passed"] and bad["errors"]["state"]["err"] > bad["errors"]["state"]["bound"]
    assert bad["errors"]["out"]["err"] <= bad["errors"]["out"]["bound"]


def test_stateful_bound_is_capped_so_a_wrong_lightning_output_fails_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lightning at 1024 tokens in bf16: the bf16 token-by-token recurrence drifts by tens of percent, so
    the low-precision rule alone would pass a 10% error; the STATEFUL_RTOL cap fails it, and the correct
    call (torch_chunk, fp32 state) still passes."""
    from attnlab.core import Result

    mod = _module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 16).bfloat16() for _ in range(3))
    good = mod.check_one("lightning", "torch_chunk", {}, True, q, k, v, rows=8, grad=False)
    assert good["passed"], good
    real = mod.attnlab.attention

    def off_by_ten_percent(*args, **kw):  # type: ignore[no-untyped-def]
        r = real(*args, **kw)
        return Result(r.out * 1.1, state=r.state)

    monkeypatch.setattr(mod.attnlab, "attention", off_by_ten_percent)
    bad = mod.check_one("lightning", "torch_chunk", {}, True, q, k, v, rows=8, grad=False)
    assert not bad["passed"] and bad["errors"]["out"]["err"] > bad["errors"]["out"]["bound"], bad
