"""An offline training corpus from text that every Python installation carries.

Sources (each a ``Document.source``), read in this order until each one's share of ``max_chars`` is spent:

- ``pydoc``: the English documentation bundled with the interpreter (``pydoc_data.topics``, the text
  ``help()`` shows), every topic;
- ``docstrings``: module, class and function docstrings of the standard library and the installed
  packages, read with :mod:`ast` (nothing is imported), one document per source file;
- ``docfiles``: documentation files of installed packages (``*.md``, ``*.rst``, ``*.txt`` and the long
  description in ``*.dist-info/METADATA``), kept only when most of their tokens are words;
- ``code``: Python source files, a minority (``code_share``, 10% by default).

Deterministic: files are visited in the order of the SHA-256 of ``"<root kind>:<path relative to the
root>"`` (a fixed, package-independent shuffle), so the same installation always gives the same corpus;
:attr:`Corpus.fingerprint` identifies it. Deduplicated: a paragraph (blank-line separated, at least 40
characters, whitespace-normalised) is kept only at its first occurrence, then whole documents by their
normalised text. Held-out split: a document goes to ``heldout`` when the first 8 bytes of the SHA-256 of
its text, read as a fraction of 2**64, fall below ``heldout_share``; the split depends on the text alone,
so no document (and, after deduplication, no paragraph) is in both splits.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.organisms.errors import ConfigError

SOURCES = ("pydoc", "docstrings", "docfiles", "code")
#: a docfile is prose when at least this share of its whitespace-separated tokens are words
PROSE_WORD_SHARE = 0.6
#: paragraphs shorter than this (whitespace-normalised) are not deduplicated (blank lines, short headings)
DEDUP_MIN_CHARS = 40
#: folders never walked into (a standard library folder may hold another interpreter's site-packages)
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_DOC_SUFFIXES = (".md", ".rst", ".txt")
_SKIP_DOC_NAMES = {"entry_points.txt", "top_level.txt", "dependency_links.txt", "requirements.txt", "RECORD"}


@dataclass(frozen=True)
class Document:
    """One document: its ``source`` (one of :data:`SOURCES`), where it came from (a pydoc topic or a
    ``<root kind>:<relative path>``) and its text."""

    source: str
    origin: str
    text: str


@dataclass(frozen=True)
class CorpusConfig:
    """What to read and how much.

    ``max_chars``: the most characters the corpus holds (both splits). ``pydoc_share``,
    ``docstring_share``, ``docfile_share`` and ``code_share``: the most each source may take of
    ``max_chars`` (``pydoc`` has about 0.4 M characters after deduplication). ``heldout_share``: the expected share of documents held out.
    ``max_doc_chars``: longer documents are cut at paragraph boundaries into pieces of at most this size
    (a paragraph longer than that is cut at the limit). ``max_file_bytes``: larger files are skipped.
    ``roots``: folders to read (default: the standard library and the site-packages of this interpreter).
    ``file``: a corpus written by :func:`save_corpus` (JSON, gzipped when the name ends in ``.gz``), read
    instead of the installation: the same documents, splits and fingerprint on any machine (the other
    fields then only describe how it was built).
    """

    max_chars: int = 6_000_000
    sources: tuple[str, ...] = SOURCES
    pydoc_share: float = 0.20
    docstring_share: float = 0.35
    docfile_share: float = 0.35
    code_share: float = 0.10
    heldout_share: float = 0.05
    max_doc_chars: int = 8_000
    min_doc_chars: int = 200
    max_file_bytes: int = 400_000
    roots: tuple[str, ...] | None = None
    file: str | None = None

    def validate(self) -> CorpusConfig:
        if self.max_chars < 1_000:
            raise ConfigError(f"corpus max_chars={self.max_chars}: expected at least 1000 characters")
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ConfigError(f"corpus sources={self.sources!r}: expected a non-empty subset of {SOURCES}")
        for name in ("pydoc_share", "docstring_share", "docfile_share", "code_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"corpus {name}={value}: expected a share between 0 and 1")
        if not 0.0 < self.heldout_share < 0.5:
            raise ConfigError(f"corpus heldout_share={self.heldout_share}: expected 0 < share < 0.5")
        if self.min_doc_chars < 1 or self.max_doc_chars < 2 * self.min_doc_chars:
            raise ConfigError(
                f"corpus min_doc_chars={self.min_doc_chars}, max_doc_chars={self.max_doc_chars}: expected "
                "min_doc_chars >= 1 and max_doc_chars >= 2 * min_doc_chars"
            )
        for root in self.roots or ():
            if not Path(root).is_dir():
                raise ConfigError(f"corpus root {root!r} is not a folder")
        return self


@dataclass
class Corpus:
    """The deduplicated documents, split into ``train`` and ``heldout`` (disjoint)."""

    config: CorpusConfig
    train: list[Document]
    heldout: list[Document]
    #: characters per source, over both splits
    chars_by_source: dict[str, int] = field(default_factory=dict)
    #: paragraphs and whole documents dropped as duplicates
    duplicates_dropped: int = 0

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of every document's split, source, origin and text, in order."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("heldout", self.heldout)):
            for d in docs:
                h.update(f"{split}\0{d.source}\0{d.origin}\0".encode())
                h.update(d.text.encode("utf-8", "surrogatepass"))
                h.update(b"\0")
        return h.hexdigest()[:16]

    def split(self, name: str) -> list[Document]:
        """The documents of split ``name`` ("train" or "heldout")."""
        if name not in ("train", "heldout"):
            raise ConfigError(f"corpus split {name!r}: expected 'train' or 'heldout'")
        return self.train if name == "train" else self.heldout

    def summary(self) -> dict[str, object]:
        """Counts for a model card: documents and characters per split, characters per source."""
        return {
            "fingerprint": self.fingerprint,
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
            "train_chars": sum(len(d.text) for d in self.train),
            "heldout_chars": sum(len(d.text) for d in self.heldout),
            "chars_by_source": dict(self.chars_by_source),
            "duplicates_dropped": self.duplicates_dropped,
            "config": {k: v for k, v in self.config.__dict__.items() if k != "roots"},
        }


def heldout_fraction(text: str) -> float:
    """The document's place in [0, 1): the first 8 bytes of SHA-256(text) over 2**64 (decides its split)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def default_roots() -> tuple[tuple[str, Path], ...]:
    """(kind, folder) pairs: the standard library, then this interpreter's site-packages (deduplicated)."""
    paths = sysconfig.get_paths()
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for kind, key in (("stdlib", "stdlib"), ("site", "purelib"), ("site", "platlib")):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in seen:
            seen.add(p)
            out.append((kind, p))
    return tuple(out)


def _roots(config: CorpusConfig) -> tuple[tuple[str, Path], ...]:
    if config.roots is None:
        return default_roots()
    return tuple((f"root{i}", Path(r).resolve()) for i, r in enumerate(config.roots))


def _files(roots: tuple[tuple[str, Path], ...], want: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Every file under the roots whose name ends with one of ``want`` (or is METADATA when ``want``
    contains it), as (origin, path), in the order of SHA-256(origin)."""
    found: list[tuple[str, Path]] = []
    for kind, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            for name in filenames:
                if name.endswith(want) or (name == "METADATA" and "METADATA" in want):
                    path = Path(dirpath) / name
                    found.append((f"{kind}:{path.relative_to(root).as_posix()}", path))
    found.sort(key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    return found


def _read(path: Path, max_bytes: int) -> str | None:
    try:
        if path.stat().st_size > max_bytes:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _is_prose(text: str) -> bool:
    words = text.split()
    if len(words) < 30:
        return False
    alpha = sum(w.strip(".,;:()[]*`\"'!?").isalpha() for w in words)
    return alpha >= PROSE_WORD_SHARE * len(words)


def _pydoc() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _docstrings(source: str) -> str | None:
    """A file's docstrings (module, classes, functions), blank-line separated; None when unparsable."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                parts.append(doc)
    return "\n\n".join(parts) or None


def _metadata_description(text: str) -> str:
    """The long description of a METADATA file: the body after the e-mail-style headers."""
    _head, sep, body = text.partition("\n\n")
    return body if sep else ""


def _source_items(
    name: str, roots: tuple[tuple[str, Path], ...], config: CorpusConfig
) -> Iterator[tuple[str, str]]:
    if name == "pydoc":
        yield from _pydoc()
        return
    if name in ("docstrings", "code"):
        for origin, path in _files(roots, (".py",)):
            text = _read(path, config.max_file_bytes)
            if text is None:
                continue
            if name == "code":
                yield origin, text
            else:
                doc = _docstrings(text)
                if doc is not None:
                    yield origin, doc
        return
    for origin, path in _files(roots, (*_DOC_SUFFIXES, "METADATA")):
        if path.name in _SKIP_DOC_NAMES or "license" in path.name.lower():
            continue
        text = _read(path, config.max_file_bytes)
        if text is None:
            continue
        if path.name == "METADATA":
            text = _metadata_description(text)
        if _is_prose(text):
            yield origin, text


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _pieces(text: str, max_chars: int) -> list[str]:
    """``text`` cut at paragraph boundaries into pieces of at most ``max_chars`` characters."""
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        while len(para) > max_chars:  # a single paragraph over the limit is cut at the limit
            if current:
                out.append(current)
                current = ""
            out.append(para[:max_chars])
            para = para[max_chars:]
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def save_corpus(corpus: Corpus, path: str | Path) -> Path:
    """Write ``corpus`` (documents with their split, counts) as JSON, gzipped when ``path`` ends in
    ``.gz``; ``CorpusConfig(file=path)`` reads it back."""
    import gzip
    import json

    data = {
        "format": "attnlab-corpus-1",
        "fingerprint": corpus.fingerprint,
        "chars_by_source": corpus.chars_by_source,
        "duplicates_dropped": corpus.duplicates_dropped,
        "documents": [
            {"split": split, "source": d.source, "origin": d.origin, "text": d.text}
            for split, docs in (("train", corpus.train), ("heldout", corpus.heldout))
            for d in docs
        ],
    }
    raw = json.dumps(data).encode("utf-8", "surrogatepass")
    path = Path(path)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def _load_corpus(config: CorpusConfig) -> Corpus:
    import gzip
    import json

    assert config.file is not None
    if not Path(config.file).is_file():
        raise ConfigError(f"corpus file {config.file!r} does not exist: expected a file from save_corpus")
    raw = Path(config.file).read_bytes()
    data = json.loads(
        (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "surrogatepass")
    )
    if not isinstance(data, dict) or data.get("format") != "attnlab-corpus-1":
        raise ConfigError(f"corpus file {config.file!r}: expected a file written by save_corpus")
    docs = {"train": [], "heldout": []}  # type: dict[str, list[Document]]
    for d in data["documents"]:
        docs[d["split"]].append(Document(d["source"], d["origin"], d["text"]))
    corpus = Corpus(
        config, docs["train"], docs["heldout"], data["chars_by_source"], data["duplicates_dropped"]
    )
    if corpus.fingerprint != data["fingerprint"]:
        raise ConfigError(
            f"corpus file {config.file!r} is damaged: its documents hash to {corpus.fingerprint}, the file "
            f"says {data['fingerprint']}"
        )
    return corpus


def build_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Read the sources in order, deduplicate, cut long documents, and split into train/held-out (or read
    ``config.file``)."""
    config = (config or CorpusConfig()).validate()
    if config.file is not None:
        return _load_corpus(config)
    roots = _roots(config)
    seen_paras: set[str] = set()
    seen_docs: set[str] = set()
    docs: list[Document] = []
    chars: dict[str, int] = {}
    dropped = 0
    total = 0
    for name in SOURCES:
        if name not in config.sources:
            continue
        share = {
            "pydoc": config.pydoc_share,
            "docstrings": config.docstring_share,
            "docfiles": config.docfile_share,
            "code": config.code_share,
        }[name]
        budget = min(int(config.max_chars * share), config.max_chars - total)
        used = 0
        for origin, text in _source_items(name, roots, config):
            if used >= budget:
                break
            if name != "code":  # paragraph-level deduplication of prose (code keeps its layout)
                kept = []
                for para in re.split(r"\n\s*\n", text):
                    key = _normalise(para)
                    if len(key) >= DEDUP_MIN_CHARS:
                        if key in seen_paras:
                            dropped += 1
                            continue
                        seen_paras.add(key)
                    kept.append(para.strip("\n"))
                text = "\n\n".join(p for p in kept if p.strip())
            for i, piece in enumerate(_pieces(text, config.max_doc_chars)):
                piece = piece[: budget - used]
                key = _normalise(piece)
                if len(piece) < config.min_doc_chars:
                    continue
                if key in seen_docs:
                    dropped += 1
                    continue
                seen_docs.add(key)
                docs.append(Document(name, origin if i == 0 else f"{origin}#{i}", piece))
                used += len(piece)
                if used >= budget:
                    break
        chars[name] = used
        total += used
    train = [d for d in docs if heldout_fraction(d.text) >= config.heldout_share]
    heldout = [d for d in docs if heldout_fraction(d.text) < config.heldout_share]
    if not heldout and len(train) >= 2:  # a tiny corpus still gets a held-out document: the lowest hash
        first = min(train, key=lambda d: heldout_fraction(d.text))
        train.remove(first)
        heldout.append(first)
    return Corpus(config, train, heldout, chars, dropped)


def prose(docs: list[Document]) -> list[Document]:
    """The documents that are prose (every source but ``code``): the haystack of the long-context tasks."""
    return [d for d in docs if d.source != "code"]
