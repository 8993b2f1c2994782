"""CPU smoke tests of the linear family's GPU scripts (``benchmarks/linear_bench.py``,
``benchmarks/linear_gpu_check.py``) at tiny shapes under the interpreter: the reference check of the
fused and the old q/k L2-norm paths, the A/B sides of the timing, and the decode-step launch profile."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.testing import on_cuda

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.skipif(on_cuda(), reason="CPU smoke test of the GPU scripts")


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    monkeypatch.syspath_prepend(str(BENCH))
    import linear_bench
    import linear_gpu_check

    monkeypatch.setattr(linear_bench, "DEV", "cpu")
    monkeypatch.setattr(linear_gpu_check, "DEV", "cpu")
    yield linear_bench, linear_gpu_check
    sys.modules.pop("linear_bench", None)


def test_check_runs_the_fused_and_the_old_l2norm_paths_against_the_reference(
    scripts: tuple[Any, Any],
) -> None:
    _, lgc = scripts
    rows = lgc.check("gated_delta", 1, 1, 12, 16, grad=True, sides=("attnlab", "attnlab-old-l2norm"))
    assert [r["side"] for r in rows] == ["attnlab", "attnlab-old-l2norm"]
    for r in rows:
        assert r["pass"], r
        assert {"dq", "dk", "dv", "dbeta", "dg", "dh0"} <= set(r)
    rows = lgc.check("gla", 1, 1, 12, 16, grad=True, sides=("attnlab-old-l2norm", "attnlab-gla-one-kernel"))
    assert [r["side"] for r in rows] == ["attnlab-gla-one-kernel"]  # (no q/k norm to A/B)
    assert rows[0]["pass"] and "dg" in rows[0], rows[0]


def test_l2norm_ab_sides_compute_the_same_function(
    scripts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lb, _ = scripts
    monkeypatch.setattr(lb, "L2NORM_AB", True)
    sides = lb.sides(1, 2, 20, 16, ("gated_delta",), fla=False)
    assert set(sides) == {"cudnn_sdpa", "gated_delta", "gated_delta[old-l2norm]"}
    (new, wrt, do), (old, wrt_old, _) = sides["gated_delta"], sides["gated_delta[old-l2norm]"]
    assert wrt is wrt_old
    g_new = lb._fwd_bwd(new, wrt, do)
    g_old = lb._fwd_bwd(old, wrt, do)
    for a, b in zip(g_new, g_old, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_decode_host_counts_what_a_step_launches(scripts: tuple[Any, Any]) -> None:
    lb, _ = scripts
    row = lb.decode_host(1, 2, 16, ("gated_delta", "lightning"), reps=5, profiled=3)
    on, off = row["gated_delta:check_values=on"], row["gated_delta:check_values=off"]
    assert on["triton_launches"] == off["triton_launches"] == 1
    assert on["aten_launching_ops"] == off["aten_launching_ops"] == 0, (on, off)
    assert (on["host_reads"], off["host_reads"]) == (1, 0)  # the in-kernel check's counts, read once
    assert row["lightning:check_values=on"]["host_reads"] == 0
    assert all(r["host_us_median"] > 0 for k, r in row.items() if ":" in k)


def test_ab_value_sides_compute_the_same_function_and_pass_the_check(
    scripts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--ab-flags`` / ``--ab-values`` (gla's fused backward off; its slices of 32; the whole previous
    backward: three settings in one side): one side per setting with its values for the whole call (the
    backward included): the gradients of the default's, and as ``--check-ab`` sides of the reference
    check, each passing it."""
    lb, lgc = scripts
    old = "GLA_BWD_FUSED=off+GLA_BWD_H_PASS=off+GLA_SKIP_ZERO_GRADS=off"
    monkeypatch.setattr(lb, "AB_FLAGS", ("GLA_BWD_FUSED",))
    monkeypatch.setattr(lb, "AB_VALUES", (lb.parse_setting("GLA_BWD_BKS=32"), lb.parse_setting(old)))
    assert lb.parse_setting(old)[1] == ("GLA_BWD_H_PASS", False)
    labels = ("[GLA_BWD_FUSED=off]", "[GLA_BWD_BKS=32]", f"[{old}]")
    for side in ("attnlab" + lab for lab in labels):  # (both tables restored after the test)
        monkeypatch.setitem(lgc.SIDES, side, lgc.run_ours)
        monkeypatch.setitem(lgc.SIDE_CONTEXT, side, lambda: contextlib.nullcontext())
    sides = lb.sides(1, 2, 20, 32, ("gla",), fla=False)
    assert set(sides) == {"cudnn_sdpa", "gla", *("gla" + lab for lab in labels)}
    fn, wrt, do = sides["gla"]
    want = lb._fwd_bwd(fn, wrt, do)
    for name in ("gla" + lab for lab in labels):
        got = lb._side_fwd_bwd(name)(sides[name][0], wrt, do)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    assert lb.register_check_sides("gated_delta") == ()
    names = lb.register_check_sides("gla")
    assert names == tuple("attnlab" + lab for lab in labels)
    rows = lgc.check("gla", 1, 1, 12, 32, grad=True, sides=("attnlab", *names))
    assert [r["side"] for r in rows] == ["attnlab", *names]
    assert all(r["pass"] and "dg" in r for r in rows), rows


def test_the_sweep_counts_a_nan_anywhere_and_refuses_unknown_variants(scripts: tuple[Any, Any]) -> None:
    """``largest_rel_diff``: the largest relative difference over the tensors, NaN when any value is not
    finite (also after the first tensor); ``sweep(only=...)`` with a label not in ``SWEEP`` is refused with
    the known labels, before anything runs."""
    lb, _ = scripts
    ref = (torch.ones(3), torch.full((2,), 2.0))
    assert lb.largest_rel_diff((torch.ones(3), torch.tensor([2.0, 2.5])), ref) == pytest.approx(0.25)
    for bad in (float("nan"), float("inf")):
        assert torch.isnan(torch.tensor(lb.largest_rel_diff((torch.ones(3), torch.tensor([2.0, bad])), ref)))
    with pytest.raises(ValueError, match=r"no variant \['sliced 99'\] of \('gla',\) in SWEEP; they are: \["):
        lb.sweep(1, 1, 16, 16, ("gla",), only=("sliced 99",))
