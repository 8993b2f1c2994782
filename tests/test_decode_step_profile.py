"""benchmarks/decode_step_profile.py on the CPU (kernels stubbed): what one page_topk decode step launches and
allocates, from the prepared op and from attnlab.hf's attention function, and that the stubs are removed."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_step_profile.py"


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU logic test: the Triton backend on a CPU needs the interpreter (the GPU run is the script itself)",
)
def test_step_launches_four_kernels_without_host_syncs(tmp_path: Path) -> None:
    from attnlab.kernels.decode import op

    spec = importlib.util.spec_from_file_location("decode_step_profile", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = {name: getattr(op, name) for name in mod.KERNELS}
    out = tmp_path / "step.json"
    mod.main(["--out", str(out), "--context", "300", "--budget", "64", "--batch", "2", "--reps", "3",
              "--warmup", "2"])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["op", "hf"]
    for r in rows:
        # page_select (scores + the step's summary pages), row top-k, split-K decode, merge
        assert r["launches"] == {name: 1.0 for name in mod.KERNELS}, r["path"]
        assert r["host_syncs_per_step"] == 0 and r["host_us_median"] > 0
        # scores, row top-k's index, the split-K partials (2), out and lse
        assert r["allocations_per_step"] == 6, r["aten_ops"]
    assert {name: getattr(op, name) for name in mod.KERNELS} == before
