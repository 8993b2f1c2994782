"""Held-out prose for the causal fidelity rows: text the small organism never trained on.

The organism's corpus (:mod:`attnlab.organisms.corpus`) splits documents by their text alone: a document is
held out when the first 8 bytes of SHA-256(text), read as a fraction of 2**64, fall below the corpus's
``heldout_share`` (0.05 for ``small``), and paragraphs of 40 characters or more are deduplicated over the
whole corpus before the split, so no such paragraph is in both splits. The ``small`` organism was trained
on a corpus saved to a file (fingerprint ``5e3e0dde5db02994``, in its ``training.json``) from the GPU
machine's installation; it does not ship with attnlab, and a corpus rebuilt from another installation
differs. So the held-out documents the workload reads are shipped here, in ``data/small_heldout.json.gz``:
whole held-out prose documents of that corpus (source, origin, text), chosen by :func:`select_heldout`,
with the corpus fingerprint and ``heldout_share``.

Why they are outside the training data, in two steps:

- the split: :func:`load_heldout` recomputes the split rule on each shipped document's text
  (``heldout_fraction(text) < heldout_share``) and refuses a file where one fails, so every document it
  returns is, by the rule that made the split, a held-out document of any corpus built with that share,
  never a training document;
- the text inside: a held-out document is not enough, since deduplication is by whole paragraph and skips
  the ``code`` source, which holds whole source files: 11 paragraphs of the first held-out docstrings
  chosen also occurred inside training documents (source files and longer paragraphs). So
  :func:`select_heldout` leaves out every document with a paragraph that occurs anywhere in the training
  split, and :func:`check_against_corpus` checks, against the corpus file itself, that each shipped
  document is in its held-out split and that no paragraph the workload reads occurs (whitespace-normalised,
  as a substring) in any training document. It ran when the file was written (``python -m
  attnlab.bench.heldout --corpus small-corpus.json.gz`` refuses to keep a file that fails), and the test
  suite reruns it where the corpus file is found (``ATTNLAB_SMALL_CORPUS``).

The workload reads the prose paragraphs of those documents (:func:`attnlab.bench.workloads.prose_of`:
unindented paragraphs of >= 12 words, mostly words; no code, doctests, tables or headings), in order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnlab.organisms.corpus import Corpus, CorpusConfig, Document, build_corpus, heldout_fraction, prose

#: the shipped held-out documents of the small organism's corpus
HELDOUT_FILE = Path(__file__).parent / "data" / "small_heldout.json.gz"
FORMAT = "attnlab-heldout-1"
#: prose sources in the order documents are taken (the Python docs first, then docstrings, then doc files)
SOURCE_ORDER = ("pydoc", "docstrings", "docfiles")
#: environment variable naming the organism's corpus file (for :func:`check_against_corpus` in tests)
CORPUS_ENV = "ATTNLAB_SMALL_CORPUS"


@dataclass(frozen=True)
class HeldoutText:
    """Held-out documents of one organism's corpus: the corpus fingerprint and held-out share they come
    from, and the documents (each satisfies the split rule)."""

    organism: str
    fingerprint: str
    heldout_share: float
    documents: list[Document]

    def paragraphs(self) -> list[str]:
        """The prose paragraphs of the documents, in order (what the workload reads)."""
        from attnlab.bench.workloads import prose_of

        return [p for d in self.documents for p in prose_of(d.text)]


def training_text(corpus: Corpus) -> str:
    """Every training document of ``corpus``, whitespace-normalised and joined (for substring checks)."""
    return "\n\0\n".join(" ".join(d.text.split()) for d in corpus.train)


def select_heldout(corpus: Corpus, count_tokens: Callable[[str], int], tokens: int) -> list[Document]:
    """Held-out prose documents of ``corpus`` in :data:`SOURCE_ORDER`, then by origin, until their prose
    paragraphs hold at least ``tokens`` tokens (``count_tokens(paragraph + "\n\n")``). Left out: documents
    without such paragraphs, and documents with a paragraph that occurs anywhere in a training document
    (deduplication is by whole paragraph and skips the ``code`` source, so a held-out docstring can sit
    inside a training source file). Fewer when the split has fewer."""
    from attnlab.bench.workloads import prose_of

    order = {s: i for i, s in enumerate(SOURCE_ORDER)}
    docs = sorted(
        (d for d in prose(corpus.heldout) if d.source in order), key=lambda d: (order[d.source], d.origin)
    )
    train = training_text(corpus)
    out, total = [], 0
    for d in docs:
        paras = prose_of(d.text)
        if not paras or any(p in train for p in paras):
            continue
        out.append(d)
        total += sum(count_tokens(p + "\n\n") for p in paras)
        if total >= tokens:
            break
    return out


def save_heldout(corpus: Corpus, docs: list[Document], organism: str, path: Path) -> Path:
    """Write ``docs`` (held-out documents of ``corpus``) as gzipped JSON with the corpus's fingerprint and
    held-out share, and each document's SHA-256."""
    data = {
        "format": FORMAT,
        "organism": organism,
        "corpus_fingerprint": corpus.fingerprint,
        "heldout_share": corpus.config.heldout_share,
        "documents": [
            {"source": d.source, "origin": d.origin, "sha256": _sha(d.text), "text": d.text} for d in docs
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(data, indent=0).encode("utf-8", "surrogatepass"), mtime=0))
    return path


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def load_heldout(path: Path = HELDOUT_FILE, split: tuple[str, float] | None = None) -> HeldoutText:
    """The held-out documents in ``path``, each checked: its text's SHA-256 as recorded, and the split rule
    (``heldout_fraction(text) < heldout_share``). A ValueError names a document that fails."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no held-out text at {path}: it ships with attnlab's source (attnlab/bench/data/); reinstall, or "
            "write it with python -m attnlab.bench.heldout --corpus <the organism's corpus file>"
        )
    data = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8", "surrogatepass"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a {FORMAT} file (written by save_heldout)")
    share = float(data["heldout_share"])
    _check_split_record(path, str(data.get("organism")), str(data.get("corpus_fingerprint")), share, split)
    docs = []
    for i, d in enumerate(data["documents"]):
        if _sha(d["text"]) != d["sha256"]:
            raise ValueError(f"{path}: document {i} ({d['origin']}) does not match its recorded SHA-256")
        frac = heldout_fraction(d["text"])
        if frac >= share:
            raise ValueError(
                f"{path}: document {i} ({d['origin']}) is not held out: heldout_fraction {frac:.4f} >= share {share}"
            )
        docs.append(Document(d["source"], d["origin"], d["text"]))
    return HeldoutText(str(data["organism"]), str(data["corpus_fingerprint"]), share, docs)


def _check_split_record(
    path: Path, organism: str, fingerprint: str, share: float, split: tuple[str, float] | None
) -> None:
    """The file's corpus fingerprint and held-out share must be ``split`` (default: those its shipped
    organism recorded when it trained, ``training.json``), so that a file cannot pass the split rule by
    stating a larger share of its own."""
    from attnlab.organisms.checkpoint import CheckpointError, organism_path

    if split is not None:
        want = (split[0], float(split[1]))
        if (fingerprint, share) != want:
            raise ValueError(
                f"{path}: corpus fingerprint {fingerprint} and held-out share {share} differ from the expected "
                f"corpus (fingerprint {want[0]}, held-out share {want[1]})"
            )
        return
    try:
        record = json.loads((organism_path(organism) / "training.json").read_text())["data"]
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"{path}: its organism {organism!r} has no training record to check the split against ({e})"
        ) from e
    want = (str(record["fingerprint"]), float(record["config"]["heldout_share"]))
    if (fingerprint, share) != want:
        raise ValueError(
            f"{path}: corpus fingerprint {fingerprint} and held-out share {share} differ from what organism "
            f"{organism!r} trained on (fingerprint {want[0]}, held-out share {want[1]})"
        )


def check_against_corpus(text: HeldoutText, corpus: Corpus) -> list[str]:
    """Every way ``text`` is not held out from ``corpus`` (empty: none): the fingerprint differs, a document
    is not in the held-out split, or a paragraph the workload reads occurs in a training document."""
    problems = []
    if corpus.fingerprint != text.fingerprint:
        problems.append(f"corpus fingerprint {corpus.fingerprint} != the held-out file's {text.fingerprint}")
    held = {d.text for d in corpus.heldout}
    problems += [f"{d.origin}: not a held-out document" for d in text.documents if d.text not in held]
    train = training_text(corpus)
    for p in text.paragraphs():
        if p in train:
            problems.append(f"a paragraph occurs in the training split: {p[:80]!r}")
    return problems


def corpus_from_env() -> Corpus | None:
    """The organism's corpus from the file named by :data:`CORPUS_ENV`, None when it is unset."""
    path = os.environ.get(CORPUS_ENV)
    return build_corpus(CorpusConfig(file=path)) if path else None


def main(argv: list[str] | None = None) -> None:
    """Write :data:`HELDOUT_FILE` from the organism's corpus file and check it against that corpus."""
    from attnlab.organisms.checkpoint import load_organism, organism_path
    from attnlab.organisms.tokenizer import encode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="the organism's corpus file (its training.json names it)")
    ap.add_argument("--organism", default="small")
    ap.add_argument(
        "--tokens", type=int, default=17_000, help="prose tokens to ship (>= the organism's context)"
    )
    ap.add_argument("--out", type=Path, default=HELDOUT_FILE)
    args = ap.parse_args(argv)
    folder = organism_path(args.organism)
    want = json.loads((folder / "training.json").read_text())["data"]["fingerprint"]
    corpus = build_corpus(CorpusConfig(file=args.corpus))
    if corpus.fingerprint != want:
        raise SystemExit(
            f"{args.corpus}: fingerprint {corpus.fingerprint}, the {args.organism} organism's is {want}"
        )
    _, tokenizer = load_organism(folder)
    docs = select_heldout(corpus, lambda s: len(encode(tokenizer, s)), args.tokens)
    save_heldout(corpus, docs, args.organism, args.out)
    text = load_heldout(args.out, split=(corpus.fingerprint, corpus.config.heldout_share))
    problems = check_against_corpus(text, corpus)
    n_tokens = sum(len(encode(tokenizer, p + "\n\n")) for p in text.paragraphs())
    print(f"{args.out}: {len(docs)} documents, {len(text.paragraphs())} paragraphs, {n_tokens} tokens; "
          f"checked against {args.corpus}: {problems or 'held out'}")  # fmt: skip
    if problems:
        args.out.unlink()
        raise SystemExit(f"{args.out} removed: it is not held out")


if __name__ == "__main__":
    main()
