"""Long-context tasks, generated from a seed at a context length in tokens, scored by exact match.

RULER (Hsieh et al., 2024) and zoology (Arora et al., 2023) are the models; the wording is ours.

============================  ===============================================================================
task                          what the prompt holds, and what the answer is
============================  ===============================================================================
``passkey``                   a pass key sentence hidden at a random depth of haystack text; the key
``niah_multikey``             ``keys`` "secret number for <word>" needles (one asked, the rest distractors);
                              the asked word's number
``niah_multivalue``           ``values`` needles for the same word at random depths; all its numbers, in the
                              order they appear, comma-separated
``variable_tracking``         ``chains`` chains of ``hops`` assignments ("VAR ABC = 40213.", "VAR DEF =
                              ABC.") spread in haystack; the names holding the asked value, in chain order
``mqar``                      multi-query associative recall: "<word>:<number>" pairs filling the context,
                              then ``queries`` keys; their values, space-separated, in the asked order
``frequent_words``            made-up words with Zipf-like counts filling the context (the top four counts
                              distinct); the ``top`` most frequent, most frequent first
============================  ===============================================================================

Conventions:

- ``length`` is the context length in tokens of the given tokenizer: ``prompt_tokens + answer_tokens <=
  length - 1`` (one token is left for the end-of-text token that follows the answer in training), and the
  haystack tasks fill the context to within one haystack sentence (at most 96 tokens) of that.
- The answer starts with a space and continues the prompt directly: ``prompt + answer`` is the full text.
  :func:`score` compares the first line of a model's continuation with the answer, both with runs of
  whitespace collapsed and ends stripped (exact match, no partial credit).
- Deterministic: the same task, length, seed, tokenizer and haystack give the same sample (randomness
  comes from ``random.Random(f"{task}:{length}:{seed}")``).
- Haystack text comes from the documents given to :class:`TaskContext`: the held-out split of the corpus
  for evaluation, the training split for training (so the held-out text stays unseen).
- Needle numbers are 5 digits (RULER uses 7), MQAR values 3 digits; the tokenizer splits digits, so a
  number is one token per digit.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from attnlab.organisms.errors import ConfigError
from attnlab.organisms.tokenizer import encode, encode_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: haystack sentences with fewer or more tokens than these bounds are not used
SENTENCE_TOKENS = (4, 96)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Sample:
    """One generated example: ``prompt + answer`` is its text (the answer starts with a space)."""

    task: str
    length: int
    seed: int
    prompt: str
    answer: str
    prompt_tokens: int
    answer_tokens: int


class TaskContext:
    """The tokenizer that measures lengths and the haystack sentences (from ``documents``, in order)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        sentences: list[str] = []
        for doc in documents:
            for para in re.split(r"\n\s*\n", doc):
                flat = " ".join(para.split())
                sentences += [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]
        counts = encode_batch(tokenizer, [" " + s for s in sentences])
        lo, hi = SENTENCE_TOKENS
        kept = [(s, len(c)) for s, c in zip(sentences, counts, strict=True) if lo <= len(c) <= hi]
        self.sentences = [s for s, _ in kept]
        self.sentence_tokens = [n for _, n in kept]
        self.haystack_tokens = sum(self.sentence_tokens)

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(encode(self.tokenizer, text))

    def filler(self, rng: random.Random, budget: int) -> list[str]:
        """Consecutive haystack sentences, from a random start (wrapping round), of at most ``budget``
        tokens in all (each counted with its leading space): the budget is filled to within one sentence."""
        if not self.sentences:
            raise ConfigError(
                "the task haystack is empty: expected documents with sentences of "
                f"{SENTENCE_TOKENS[0]}-{SENTENCE_TOKENS[1]} tokens"
            )
        if budget > self.haystack_tokens:
            raise ConfigError(
                f"the haystack holds {self.haystack_tokens} tokens; a sample needs {budget}: give more "
                "documents (a larger corpus) or ask for a shorter length"
            )
        out: list[str] = []
        i = rng.randrange(len(self.sentences))
        used = 0
        while used + self.sentence_tokens[i] <= budget:
            out.append(self.sentences[i])
            used += self.sentence_tokens[i]
            i = (i + 1) % len(self.sentences)
        return out


#: (ctx, rng, length, **options) -> (prompt, answer)
Generator = Callable[..., tuple[str, str]]


@dataclass(frozen=True)
class Task:
    """A registered task: its name, one line of description and its generator ``(ctx, rng, length) ->
    (prompt, answer)``."""

    name: str
    description: str
    make: Generator


TASKS: dict[str, Task] = {}


def _task(name: str, description: str) -> Callable[[Generator], Generator]:
    def register(fn: Generator) -> Generator:
        TASKS[name] = Task(name, description, fn)
        return fn

    return register


def options(task: str) -> dict[str, int]:
    """The options of ``task`` and their defaults (``keys``, ``values``, ``chains``, ``hops``, ``queries``,
    ``top``: see the module docstring)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    params = list(inspect.signature(TASKS[task].make).parameters.values())[3:]
    return {p.name: p.default for p in params}


def generate(task: str, ctx: TaskContext, length: int, seed: int, **opts: int) -> Sample:
    """The sample of ``task`` at ``length`` tokens for ``seed`` (see the module docstring); ``opts``
    override the task's :func:`options` (each a positive integer)."""
    known = options(task)
    for name, value in opts.items():
        if name not in known:
            raise ConfigError(f"task {task!r} has no option {name!r}: expected some of {sorted(known)}")
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"task {task!r} option {name}={value!r}: expected a positive integer")
    if not isinstance(length, int) or length < 64:
        raise ConfigError(f"task length={length!r}: expected an integer number of tokens >= 64")
    rng = random.Random(f"{task}:{length}:{seed}")
    prompt, answer = TASKS[task].make(ctx, rng, length, **opts)
    p, a = ctx.count(prompt), ctx.count(answer)
    if p + a > length - 1:  # the generators trim to fit; this guards the contract
        raise AssertionError(f"{task} at {length}: {p}+{a} tokens exceed {length - 1}")
    return Sample(task, length, seed, prompt, answer, p, a)


def score(sample: Sample, completion: str) -> bool:
    """Exact match of the completion's first line with the answer (whitespace runs collapsed)."""
    first = completion.split("\n", 1)[0]
    return " ".join(first.split()) == " ".join(sample.answer.split())


# ---------------------------------------------------------------------------------------------- helpers


def _number(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _numbers(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _number(rng)
        if v not in out:
            out.append(v)
    return out


def _words(rng: random.Random, n: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct made-up lowercase words of consonant-vowel syllables."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        k = rng.randint(*syllables)
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(k))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct upper-case variable names of three letters."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        if w not in out:
            out.append(w)
    return out


def _haystack(
    ctx: TaskContext,
    rng: random.Random,
    length: int,
    header: str,
    needles: list[str],
    depths: list[float],
    question: str,
    answer: str,
) -> str:
    """``header`` + haystack sentences with ``needles`` inserted at ``depths`` (fractions of the
    haystack, needles kept in the order given when depths tie) + ``question``, fitting ``length``."""
    fixed = ctx.count(header) + sum(ctx.count(" " + n) for n in needles) + ctx.count(question + answer)
    budget = length - 1 - fixed - 2  # 2 tokens of slack for merges at the joins
    if budget < 8:
        raise ConfigError(
            f"length={length} is too short for this task: its needles and question take {fixed} tokens; "
            f"expected length >= {fixed + 11}"
        )
    items = list(ctx.filler(rng, budget))
    slots = [round(d * len(items)) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (slots[i], i))
    is_needle = [False] * len(items)
    for shift, i in enumerate(order):  # later needles shift by the ones inserted before them
        items.insert(slots[i] + shift, needles[i])
        is_needle.insert(slots[i] + shift, True)
    answer_tokens = ctx.count(answer)
    while True:
        prompt = header + " ".join(items) + question
        over = ctx.count(prompt) + answer_tokens - (length - 1)
        if over <= 0:
            return prompt
        while over > 0:  # drop haystack sentences from the end, as many tokens as the prompt is over
            drop = max(j for j, needle in enumerate(is_needle) if not needle)
            over -= ctx.count(" " + items[drop])
            del items[drop], is_needle[drop]


def _fit(ctx: TaskContext, length: int, build: Callable[[int], tuple[str, str]], hi: int) -> tuple[str, str]:
    """``build(n)`` for the largest ``n <= hi`` whose prompt and answer fit ``length`` (bisection)."""
    fits = lambda n: sum(ctx.count(x) for x in build(n)) <= length - 1
    lo_n, hi_n = 1, hi
    probe = min(hi, 32)  # narrow the search with the tokens per item of a short build (same result)
    per = sum(ctx.count(x) for x in build(probe)) / probe
    guess = int(length / per) if per > 0 else hi
    if guess // 2 >= 1 and fits(guess // 2):
        lo_n = guess // 2
    if guess * 2 < hi and not fits(guess * 2):
        hi_n = guess * 2
    n = bisect.bisect_left(range(lo_n, hi_n + 1), True, key=lambda n: not fits(n))  # first that does not fit
    n += lo_n - 1
    if n == 0:
        raise ConfigError(f"length={length} is too short for this task: expected a longer context")
    return build(n)


# ---------------------------------------------------------------------------------------------- tasks


@_task("passkey", "a pass key hidden in haystack text; answer the key")
def _passkey(ctx: TaskContext, rng: random.Random, length: int) -> tuple[str, str]:
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    header = "A pass key is hidden in the text below. Find it and remember it.\n\n"
    question = "\n\nWhat is the pass key? The pass key is"
    answer = f" {key}"
    return _haystack(ctx, rng, length, header, [needle], [rng.random()], question, answer), answer


@_task("niah_multikey", "4 secret-number needles for different words; answer the asked word's number")
def _niah_multikey(ctx: TaskContext, rng: random.Random, length: int, keys: int = 4) -> tuple[str, str]:
    words, values = _words(rng, keys), _numbers(rng, keys)
    needles = [f"The secret number for {w} is {v}." for w, v in zip(words, values, strict=True)]
    asked = rng.randrange(keys)
    header = "Secret numbers are hidden in the text below.\n\n"
    question = f"\n\nWhat is the secret number for {words[asked]}? The secret number for {words[asked]} is"
    answer = f" {values[asked]}"
    depths = [rng.random() for _ in needles]
    return _haystack(ctx, rng, length, header, needles, depths, question, answer), answer


@_task("niah_multivalue", "4 needles for one word; answer all its numbers in order of appearance")
def _niah_multivalue(ctx: TaskContext, rng: random.Random, length: int, values: int = 4) -> tuple[str, str]:
    (word,) = _words(rng, 1)
    numbers = _numbers(rng, values)
    depths = sorted(rng.random() for _ in range(values))  # the i-th number appears i-th
    needles = [f"A secret number for {word} is {v}." for v in numbers]
    header = "Secret numbers are hidden in the text below.\n\n"
    question = f"\n\nList every secret number for {word}, in order. The secret numbers for {word} are"
    answer = " " + ", ".join(numbers)
    return _haystack(ctx, rng, length, header, needles, depths, question, answer), answer


@_task("variable_tracking", "2 chains of 4 assignments in haystack; answer the names holding the value")
def _variable_tracking(
    ctx: TaskContext, rng: random.Random, length: int, chains: int = 2, hops: int = 4
) -> tuple[str, str]:
    names = _names(rng, chains * (hops + 1))
    values = _numbers(rng, chains)
    needles: list[str] = []
    depths: list[float] = []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        needles.append(f"VAR {chain[0]} = {values[c]}.")
        needles += [f"VAR {b} = {a}." for a, b in itertools.pairwise(chain)]
        depths += sorted(rng.random() for _ in chain)  # each chain in order; chains interleave
    header = "Variables are assigned in the text below.\n\n"
    question = f"\n\nWhich variables hold the value {values[0]}? In order:"
    answer = " " + " ".join(names[: hops + 1])
    return _haystack(ctx, rng, length, header, needles, depths, question, answer), answer


@_task("mqar", "word:number pairs fill the context; answer the values of 4 asked keys")
def _mqar(ctx: TaskContext, rng: random.Random, length: int, queries: int = 4) -> tuple[str, str]:
    hi = max(queries, length // 4)
    keys = _words(rng, hi)
    values = [_number(rng, 3) for _ in range(hi)]
    picks = [rng.random() for _ in range(queries)]  # which pairs are asked, as fractions of the pairs

    def build(n: int) -> tuple[str, str]:
        n = max(n, queries)
        asked: list[int] = []
        for p in picks:  # distinct pair indices drawn from the fractions, deterministic in n
            i = int(p * n)
            while i in asked:
                i = (i + 1) % n
            asked.append(i)
        pairs = " ".join(f"{keys[i]}:{values[i]}" for i in range(n))
        prompt = (
            f"Each key is followed by its value.\n\n{pairs}\n\nValues of {' '.join(keys[i] for i in asked)}:"
        )
        return prompt, " " + " ".join(values[i] for i in asked)

    return _fit(ctx, length, build, hi)


@_task("frequent_words", "made-up words with Zipf-like counts; answer the 3 most frequent, in order")
def _frequent_words(ctx: TaskContext, rng: random.Random, length: int, top: int = 3) -> tuple[str, str]:
    vocab = _words(rng, 40, syllables=(1, 2))
    alpha = 1.3
    weights = [1 / (i + 1) ** alpha for i in range(len(vocab))]
    order = list(range(len(vocab)))
    rng.shuffle(order)
    header = "Read the list of words below.\n\n"
    question = f"\n\nThe {top} most frequent words above, most frequent first:"

    def build(total: int) -> tuple[str, str]:
        counts = [max(1, round(total * w / sum(weights))) for w in weights]
        for i in range(top, 0, -1):  # the top counts strictly decrease, and exceed every other count
            counts[i - 1] = max(counts[i - 1], counts[i] + 1)
        words = [vocab[order[i]] for i, c in enumerate(counts) for _ in range(c)]
        random.Random(total).shuffle(words)
        return header + " ".join(words) + question, " " + " ".join(vocab[order[i]] for i in range(top))

    return _fit(ctx, length, build, length)
