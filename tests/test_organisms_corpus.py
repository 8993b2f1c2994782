"""The offline corpus (deterministic, deduplicated, disjoint splits) and the byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.organisms.corpus import CorpusConfig, Document, build_corpus, heldout_fraction, prose
from attnlab.organisms.errors import CheckpointError, ConfigError
from attnlab.organisms.tokenizer import (
    EOS,
    MIN_VOCAB,
    PAD,
    decode,
    encode,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

SMALL = CorpusConfig(max_chars=120_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.1)


@pytest.fixture(scope="module")
def corpus():  # type: ignore[no-untyped-def]
    return build_corpus(SMALL)


@pytest.fixture(scope="module")
def tokenizer(corpus):  # type: ignore[no-untyped-def]
    return train_tokenizer((d.text for d in corpus.train), vocab_size=600)


def test_corpus_is_deterministic_and_split_disjoint(corpus) -> None:  # type: ignore[no-untyped-def]
    again = build_corpus(SMALL)
    assert again.fingerprint == corpus.fingerprint
    assert [d.text for d in again.heldout] == [d.text for d in corpus.heldout]
    train, held = {d.text for d in corpus.train}, {d.text for d in corpus.heldout}
    assert train and held and not train & held
    # the split follows the documented rule: the hash of the text against heldout_share
    assert all(heldout_fraction(d.text) < SMALL.heldout_share for d in corpus.heldout)
    assert all(heldout_fraction(d.text) >= SMALL.heldout_share for d in corpus.train)
    sizes = [len(d.text) for d in corpus.train + corpus.heldout]
    assert sum(sizes) <= SMALL.max_chars
    assert min(sizes) >= SMALL.min_doc_chars and max(sizes) <= SMALL.max_doc_chars


def test_corpus_deduplicates_paragraphs(tmp_path: Path) -> None:
    para = "This paragraph about attention appears in two files of the same installation, word for word."
    other = "A different paragraph, long enough to be kept on its own, about recurrent state and decoding."
    (tmp_path / "a.md").write_text(f"{para}\n\n{other} " * 1 + "\n\nfirst " + "word " * 60)
    (tmp_path / "b.md").write_text(f"{para}\n\nsecond " + "word " * 60)
    c = build_corpus(
        CorpusConfig(max_chars=10_000, sources=("docfiles",), docfile_share=1.0, roots=(str(tmp_path),))
    )
    docs = c.train + c.heldout
    assert len(docs) == 2
    assert sum(d.text.count(para) for d in docs) == 1
    assert c.duplicates_dropped == 1
    assert {d.source for d in docs} == {"docfiles"}


def test_prose_leaves_code_out() -> None:
    docs = [Document("code", "x", "import os"), Document("pydoc", "y", "Prose.")]
    assert [d.source for d in prose(docs)] == ["pydoc"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_chars": 10}, "max_chars=10"),
        ({"sources": ("wiki",)}, "sources=\\('wiki',\\)"),
        ({"code_share": 1.5}, "code_share=1.5"),
        ({"heldout_share": 0.0}, "heldout_share=0.0"),
        ({"roots": ("/no/such/folder",)}, "/no/such/folder"),
    ],
)
def test_corpus_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CorpusConfig(**kwargs).validate()  # type: ignore[arg-type]


def test_corpus_split_name_error(corpus) -> None:  # type: ignore[no-untyped-def]
    assert corpus.split("heldout") is corpus.heldout
    with pytest.raises(ConfigError, match="split 'test': expected 'train' or 'heldout'"):
        corpus.split("test")


def test_tokenizer_round_trip(tokenizer, corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert len(tokenizer) == 600
    texts = [
        corpus.heldout[0].text,
        "Hello  wörld\n\t  tabs, 日本語, emoji 🙂 and a literal " + EOS + " and " + PAD,
        "",
    ]
    for text in texts:
        assert decode(tokenizer, encode(tokenizer, text)) == text
    assert encode_batch(tokenizer, texts) == [encode(tokenizer, t) for t in texts]
    # numbers are cut into groups of two digits from the left, the leading space kept with the first
    # group, wherever the number stands (so a copied number is the same tokens)
    for text, groups in (
        (" 40213", [" 40", "21", "3"]),
        ("x40213.", ["x", "40", "21", "3", "."]),
        (" 7", [" 7"]),
    ):
        ids = encode(tokenizer, text)
        assert [decode(tokenizer, [i]) for i in ids] == groups, text
    assert encode(tokenizer, "The key is 40213.")[-4:-1] == encode(tokenizer, " 40213")
    # every group is a token of its own, whatever the training text held
    vocab = tokenizer.get_vocab()
    for i in range(100):
        assert f"{i:02d}" in vocab and f"\u0120{i:02d}" in vocab
    assert all(f"\u0120{i}" in vocab for i in range(10))
    # special tokens: never produced by text, ids of their own
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == PAD
    assert tokenizer.eos_token_id not in encode(tokenizer, texts[1])
    save_tokenizer(tokenizer, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert encode(again, texts[1]) == encode(tokenizer, texts[1])
    assert again.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"vocab_size=100: expected an integer >= {MIN_VOCAB}"):
        train_tokenizer(["text"], vocab_size=100)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_saved_corpus_reads_back_the_same(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from attnlab.organisms.corpus import save_corpus

    path = save_corpus(corpus, tmp_path / "corpus.json.gz")
    again = build_corpus(CorpusConfig(file=str(path)))
    assert again.fingerprint == corpus.fingerprint and again.train == corpus.train
    assert again.heldout == corpus.heldout and again.chars_by_source == corpus.chars_by_source
    with pytest.raises(ConfigError, match="corpus file '.*missing.json' does not exist"):
        build_corpus(CorpusConfig(file=str(tmp_path / "missing.json")))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="expected a file written by save_corpus"):
        build_corpus(CorpusConfig(file=str(tmp_path / "other.json")))
