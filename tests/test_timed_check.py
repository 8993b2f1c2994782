"""benchmarks/timed_check.py: the last-rows check against the reference passes a right backend, fails a wrong one."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

import attnlab

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
