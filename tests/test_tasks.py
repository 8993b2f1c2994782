"""The long-context task generators: deterministic, within their length, answers checked independently."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from attnlab.organisms.corpus import CorpusConfig, build_corpus, prose
from attnlab.organisms.errors import ConfigError
from attnlab.organisms.tasks import SENTENCE_TOKENS, TASKS, TaskContext, generate, options, score
from attnlab.organisms.tokenizer import train_tokenizer

LENGTHS = (256, 1024)
HAYSTACK_TASKS = ("passkey", "niah_multikey", "niah_multivalue", "variable_tracking")


@pytest.fixture(scope="module")
def ctx() -> TaskContext:
    corpus = build_corpus(CorpusConfig(max_chars=150_000, sources=("pydoc",), pydoc_share=1.0))
    tok = train_tokenizer((d.text for d in corpus.train), vocab_size=600)
    return TaskContext(tok, [d.text for d in prose(corpus.train)])


def test_every_task_is_registered() -> None:
    assert set(TASKS) == {*HAYSTACK_TASKS, "mqar", "frequent_words"}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_fits_length_and_scores(ctx: TaskContext, task: str, length: int) -> None:
    s = generate(task, ctx, length, seed=7)
    assert generate(task, ctx, length, seed=7) == s
    assert generate(task, ctx, length, seed=8).prompt != s.prompt
    assert s.prompt_tokens == ctx.count(s.prompt) and s.answer_tokens == ctx.count(s.answer)
    assert s.prompt_tokens + s.answer_tokens <= length - 1
    # the context is filled: to within one haystack sentence (the filler stops at the first that does
    # not fit), a few tokens of slack for merges at the joins
    assert s.prompt_tokens + s.answer_tokens >= length - 1 - SENTENCE_TOKENS[1] - 4
    assert s.prompt_tokens + s.answer_tokens >= 0.85 * length or length < 1024
    assert s.answer.startswith(" ") and s.answer.strip()
    assert score(s, s.answer) and score(s, s.answer + "\nanything after the first line")
    assert score(s, "  " + s.answer.strip() + "  ")
    assert not score(s, s.answer + "0") and not score(s, "") and not score(s, "\n" + s.answer)


def _needle_value(prompt: str, pattern: str) -> list[str]:
    return re.findall(pattern, prompt)


def test_passkey_answer_is_the_hidden_key(ctx: TaskContext) -> None:
    s = generate("passkey", ctx, 512, seed=3)
    (key,) = set(_needle_value(s.prompt, r"The pass key is (\d+)\."))
    assert s.answer == f" {key}" and len(key) == 5


def test_multikey_has_distractors_and_answers_the_asked_key(ctx: TaskContext) -> None:
    s = generate("niah_multikey", ctx, 512, seed=3)
    pairs = dict(re.findall(r"The secret number for (\w+) is (\d+)\.", s.prompt))
    assert len(pairs) == 4
    asked = re.search(r"What is the secret number for (\w+)\?", s.prompt)
    assert asked and s.answer == f" {pairs[asked.group(1)]}"


def test_multivalue_answer_lists_values_in_order(ctx: TaskContext) -> None:
    s = generate("niah_multivalue", ctx, 512, seed=3)
    values = re.findall(r"A secret number for \w+ is (\d+)\.", s.prompt)
    assert len(values) == 4 and s.answer == " " + ", ".join(values)


def test_variable_tracking_answer_follows_the_chain(ctx: TaskContext) -> None:
    s = generate("variable_tracking", ctx, 512, seed=3)
    value: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR (\w+) = (\w+)\.", s.prompt):  # resolve in order of appearance
        value[name] = value.get(rhs, rhs)
    asked = re.search(r"hold the value (\d+)\?", s.prompt)
    assert asked
    holders = [n for n, v in value.items() if v == asked.group(1)]
    assert len(value) == 10 and len(holders) == 5
    assert s.answer.split() == holders


def test_mqar_answers_the_values_of_the_asked_keys(ctx: TaskContext) -> None:
    s = generate("mqar", ctx, 512, seed=3)
    pairs = re.findall(r"(\w+):(\d+)", s.prompt)
    table = dict(pairs)
    assert len(table) == len(pairs) > 20  # keys are unique, and many
    asked = s.prompt.rsplit("Values of ", 1)[1].rstrip(":").split()
    assert len(asked) == 4 and len(set(asked)) == 4
    assert s.answer.split() == [table[k] for k in asked]


def test_frequent_words_answer_is_the_top_three(ctx: TaskContext) -> None:
    s = generate("frequent_words", ctx, 512, seed=3)
    body = s.prompt.split("\n\n")[1]
    counts = Counter(body.split()).most_common()
    assert [w for w, _ in counts[:3]] == s.answer.split()
    assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]  # no ties decide the answer


def test_task_options(ctx: TaskContext) -> None:
    assert options("niah_multikey") == {"keys": 4}
    assert options("variable_tracking") == {"chains": 2, "hops": 4}
    s = generate("niah_multikey", ctx, 512, seed=3, keys=6)
    assert len(re.findall(r"The secret number for \w+ is \d+\.", s.prompt)) == 6
    s = generate("mqar", ctx, 512, seed=3, queries=2)
    assert len(s.answer.split()) == 2
    with pytest.raises(ConfigError, match="task 'passkey' has no option 'keys': expected some of \\[\\]"):
        generate("passkey", ctx, 512, seed=0, keys=2)
    with pytest.raises(ConfigError, match="option hops=0: expected a positive integer"):
        generate("variable_tracking", ctx, 512, seed=0, hops=0)


def test_task_errors(ctx: TaskContext) -> None:
    with pytest.raises(ConfigError, match="unknown task 'pass_key'"):
        generate("pass_key", ctx, 512, seed=0)
    with pytest.raises(ConfigError, match="length=32: expected an integer number of tokens >= 64"):
        generate("passkey", ctx, 32, seed=0)
    with pytest.raises(ConfigError, match="too short for this task"):
        generate("variable_tracking", ctx, 64, seed=0)
    with pytest.raises(ConfigError, match="the haystack holds"):
        generate("passkey", ctx, ctx.haystack_tokens * 2, seed=0)
    with pytest.raises(ConfigError, match="the task haystack is empty"):
        generate("passkey", TaskContext(ctx.tokenizer, []), 256, seed=0)
