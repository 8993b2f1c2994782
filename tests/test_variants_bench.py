"""benchmarks/variants_bench.py's neighborhood mode, on the CPU at tiny sizes: its last-rows reference is
the method's, and a point's speed-ups over dense and shares of the ideal 1 / density (token and block)
are computed from the timings and the plans it reports (the timer replaced by fixed times, so the
arithmetic is checked exactly; the GPU run is the lead's, see the module doc).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import attnlab
from attnlab.bench.timing import Timing
from attnlab.catalog.structured import neighborhood
from attnlab.testing import on_cuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("variants_bench", ROOT / "benchmarks" / "variants_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("causal", [False, True])
def test_neighborhood_rows_reference_is_the_methods_last_rows(vb: ModuleType, causal: bool) -> None:
    params: dict[str, Any] = {"shape": (6, 7), "window": (3, 5), "dilation": (2, 1)}
    q, k, v = (torch.randn(1, 2, 42, 16) for _ in range(3))
    ref = vb.neighborhood_rows_reference(params, 42, causal, torch.device("cpu"))
    got = ref(q[:, :, -9:], k, v, {}, causal, True)
    want = neighborhood.reference(
        q, k, v, neighborhood.NeighborhoodParams(**params), causal=causal, scale=16**-0.5
    )
    torch.testing.assert_close(got, want[:, :, -9:])


def test_neighborhood_point_reports_speedups_against_dense_and_ideal(
    vb: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """8 x 8 tokens, 3 x 3 windows: every query sees 9 keys (NATTEN shifts the border windows), token
    density 9 / 64; sides checked before timing; x dense = t(dense) / t(side); of ideal = x dense *
    density, at the token level and at the block level of the plan that side runs."""
    monkeypatch.setattr(vb, "HEADS", 2)
    monkeypatch.setattr(vb, "HEAD_DIM", 16)
    monkeypatch.setattr(vb, "CHECK_ROWS", 8)
    monkeypatch.setattr(vb, "NEIGHBORHOOD_BACKENDS", ("sdpa_mask",))  # (no Flex compile, no interpreter)
    fixed = {"cudnn_dense": 10.0, "ours": 4.0, "sdpa_mask": 2.0}
    called: list[str] = []

    def fake_timer(fns: dict[str, Any], device: torch.device, **kw: Any) -> dict[str, Timing]:
        for name, fn in fns.items():
            fn()  # each timed closure runs
            called.append(name)
        return {name: Timing(fixed[name], fixed[name], 10, None, fixed[name], fixed[name]) for name in fns}

    monkeypatch.setattr(vb, "measure_interleaved", fake_timer)
    logged: list[dict[str, Any]] = []
    params: dict[str, Any] = {"shape": (8, 8), "window": 3}
    row = vb.neighborhood_point("2d-8x8-w3", params, False, torch.device("cpu"), ["fwd_bwd"], logged.append)

    assert sorted(called) == ["cudnn_dense", "ours", "sdpa_mask"]
    assert all(c["passed"] for c in row["checks"]) and len(row["checks"]) == 2
    ours = row["ours_backend_fwd_bwd"]
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    chosen = attnlab.prepare("neighborhood", **params).explain(q, q, q).backend
    assert chosen is not None and ours == chosen.name
    plan = row["plans"]["sdpa_mask"]
    assert plan["token_density"] == pytest.approx(9 / 64)
    assert plan["ideal_token"] == pytest.approx(64 / 9)
    assert 9 / 64 <= plan["block_density"] <= 1.0
    assert row["sdpa_mask_fwd_bwd_vs_dense"] == pytest.approx(5.0)
    assert row["sdpa_mask_fwd_bwd_of_ideal_token"] == pytest.approx(5.0 * 9 / 64)
    assert row["sdpa_mask_fwd_bwd_of_ideal_block"] == pytest.approx(5.0 * plan["block_density"])
    assert row["ours_fwd_bwd_vs_dense"] == pytest.approx(2.5)
    assert row["ours_fwd_bwd_of_ideal_token"] == pytest.approx(2.5 * row["plans"][ours]["token_density"])

    path = tmp_path / "neighborhoods.jsonl"
    path.write_text("\n".join(json.dumps(o, default=str) for o in [{"env": {"device": "cpu"}}, {"row": row}]))
    table = vb.summarize(str(path))
    line = next(ln for ln in table.splitlines() if "| sdpa_mask |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5:10] == ["ok", "2.00", "10.00", "5.00", f"{64 / 9:.1f}"]
    assert cells[10] == f"{5.0 * 9 / 64:.2f}"
    assert any(f"| ours ({ours}) |" in ln for ln in table.splitlines())


def test_unfused_side_switches_the_helper_off_for_its_call(
    vb: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """affine_scaled timed with its fused map (forced on the CPU under the interpreter) and, as the
    ``unfused`` side, with it off for that call only: both checked against the reference, both timed, the
    helper's switch restored; the table's last column is the unfused side's ratio."""
    from attnlab.catalog.variants import affine_scaled
    from attnlab.kernels.score_transform import affine

    monkeypatch.setattr(vb, "HEADS", 2)
    monkeypatch.setattr(vb, "HEAD_DIM", 16)
    monkeypatch.setattr(vb, "CHECK_ROWS", 8)
    monkeypatch.setattr(affine_scaled, "FUSED_DEVICES", ("cuda", "cpu"))
    seen: list[tuple[str, ...]] = []
    real = affine.affine_finish

    def spy(*args: Any) -> torch.Tensor:
        seen.append(affine_scaled.FUSED_DEVICES)
        return real(*args)

    monkeypatch.setattr(affine, "affine_finish", spy)
    fixed = {"cudnn_softmax": 3.0, "ours": 4.0, "unfused": 6.0}

    def fake_timer(fns: dict[str, Any], device: torch.device, **kw: Any) -> dict[str, Timing]:
        for fn in fns.values():
            fn()
        return {name: Timing(fixed[name], fixed[name], 10, None, fixed[name], fixed[name]) for name in fns}

    monkeypatch.setattr(vb, "measure_interleaved", fake_timer)
    n_fused_before = len(seen)
    dev = torch.device(
        "cuda" if on_cuda() else "cpu"
    )  # (CPU tensors take the helper under the interpreter only)
    row = vb.point("affine_scaled", 40, True, dev, False, ["fwd_bwd"], lambda obj: None)
    assert affine_scaled.FUSED_DEVICES == ("cuda", "cpu") and len(seen) > n_fused_before
    assert {c["side"] for c in row["checks"]} == {"ours", "unfused"} and all(
        c["passed"] for c in row["checks"]
    )
    assert row["unfused_fwd_bwd_ratio_vs_cudnn"] == pytest.approx(0.5)
    assert row["ours_fwd_bwd_ratio_vs_cudnn"] == pytest.approx(0.75)
    path = tmp_path / "variants.jsonl"
    path.write_text("\n".join(json.dumps(o, default=str) for o in [{"env": {"device": "cpu"}}, {"row": row}]))
    line = next(ln for ln in vb.summarize(str(path)).splitlines() if ln.startswith("| affine_scaled"))
    assert line.strip("| ").split(" | ")[-1] == "0.50"
    probe = {"alpha": torch.rand(1, 2, 5, device=dev), "beta": torch.rand(1, 2, 5, device=dev)}
    calls_before = len(seen)
    q = torch.randn(1, 2, 5, 16, device=dev)
    vb._unfused(vb._call("affine_scaled", True, "sdpa"), *vb.UNFUSED["affine_scaled"])(q, q, q, **probe)
    assert len(seen) == calls_before  # off for that call
    assert affine_scaled.FUSED_DEVICES == ("cuda", "cpu")  # and restored


def test_opt_in_side_turns_the_option_on_for_its_call_only(
    vb: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """softplus's ``poly`` side (``OPT_IN``): the polynomial's device tuple holds ("cuda", "cpu") during that
    side's call and is empty again after; the side is checked and timed beside ``ours`` and ``unfused``."""
    from attnlab.kernels.score_transform import op

    label, module, attr = vb.OPT_IN["softplus"]
    assert (label, attr) == ("poly", "SOFTPLUS_POLY_DEVICES") and op.SOFTPLUS_POLY_DEVICES == ()
    seen: list[tuple[str, ...]] = []

    def probe(q: Any, k: Any, v: Any, **x: Any) -> Any:
        seen.append(op.SOFTPLUS_POLY_DEVICES)
        return q

    vb._unfused(probe, module, attr, ("cuda", "cpu"))(1, 2, 3)
    assert seen == [("cuda", "cpu")] and op.SOFTPLUS_POLY_DEVICES == ()
    monkeypatch.setattr(vb, "HEADS", 2)
    monkeypatch.setattr(vb, "HEAD_DIM", 16)
    monkeypatch.setattr(vb, "CHECK_ROWS", 8)
    fixed = {"cudnn_softmax": 3.0, "ours": 4.0, "unfused": 6.0, "poly": 3.0}

    def fake_timer(fns: dict[str, Any], device: torch.device, **kw: Any) -> dict[str, Timing]:
        return {name: Timing(fixed[name], fixed[name], 10, None, fixed[name], fixed[name]) for name in fns}

    monkeypatch.setattr(vb, "measure_interleaved", fake_timer)
    monkeypatch.setattr(vb, "EXPLICIT", {"softplus": "triton"})  # (on a CPU: the kernel, interpreted)
    dev = torch.device("cuda" if on_cuda() else "cpu")
    row = vb.point("softplus", 40, True, dev, False, ["fwd"], lambda obj: None)
    assert {c["side"] for c in row["checks"]} == {"ours", "unfused", "poly"}
    assert all(c["passed"] for c in row["checks"]), row["checks"]
    assert row["poly_fwd_ratio_vs_cudnn"] == pytest.approx(1.0)
