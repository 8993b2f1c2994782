"""Task accuracy and held-out perplexity of a causal LM (greedy decoding, exact match)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from attnlab.organisms.errors import ConfigError
from attnlab.organisms.tasks import TaskContext, generate, score
from attnlab.organisms.tokenizer import decode, encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

#: evaluation samples use seeds 0, 1, ...; training samples use seeds from this value up
TRAIN_SEED_BASE = 1_000_000


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    ids: list[int],
    max_new: int,
    stop: Sequence[int],
    times: list[float] | None = None,
    prefilled: tuple[torch.Tensor, Any] | None = None,
    keep: list[tuple[torch.Tensor, Any]] | None = None,
) -> list[int]:
    """Greedy continuation of ``ids`` (a KV cache carries the prefix): at most ``max_new`` tokens, ending
    before the first token in ``stop``. ``times``, when given, receives the seconds of the prefill forward
    pass (unless ``prefilled``) and then of each decode step (each including the next token's argmax, which
    waits for the device; the prefill is timed with an explicit CUDA synchronisation).

    ``prefilled``: (the prefill's last logits row, its KV cache) from an earlier prefill of the same
    ``ids`` by the same model and attention: the prefill is not run again (the cache is copied, never
    changed). ``keep``: receives that pair from this call's prefill (a copy of the cache)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if prefilled is None:
        if times is not None:
            sync()
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        if times is not None:
            sync()
            times.append(time.perf_counter() - started)
        logits, cache = out.logits[0, -1], out.past_key_values
        if keep is not None:
            keep.append((logits.clone(), copy.deepcopy(cache)))
    else:
        logits, cache = prefilled[0], copy.deepcopy(prefilled[1])
    new: list[int] = []
    for _ in range(max_new):
        tok = int(logits.argmax())
        if times is not None and new:
            times.append(time.perf_counter() - started)
        if tok in stop:
            break
        new.append(tok)
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True)
        logits, cache = out.logits[0, -1], out.past_key_values
    return new


def task_accuracy(
    model: PreTrainedModel,
    ctx: TaskContext,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    advance: Callable[[], None] | None = None,
) -> dict[str, dict[int, float]]:
    """Exact-match accuracy per task and length over ``samples`` samples (seeds 0..samples-1), greedy
    decoding of at most (answer tokens + 2) tokens, stopping at a newline or the end-of-text token.
    A task that cannot make a sample at a length (too short for its fixed text) gets NaN there."""
    tok: PreTrainedTokenizerFast = ctx.tokenizer
    stop = {tok.eos_token_id, *encode(tok, "\n")}
    model.eval()
    acc: dict[str, dict[int, float]] = {}
    for task in tasks:
        for length in lengths:
            right = 0
            for seed in range(samples):
                try:
                    s = generate(task, ctx, length, seed)
                except ConfigError:
                    right = -1
                    break
                new = greedy(model, encode(tok, s.prompt), s.answer_tokens + 2, sorted(stop))
                right += score(s, decode(tok, new))
                if advance:
                    advance()
            acc.setdefault(task, {})[length] = right / samples if samples and right >= 0 else math.nan
    return acc


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, ids: list[int], length: int, windows: int) -> float:
    """Mean next-token cross-entropy (nats) over up to ``windows`` consecutive windows of ``length`` tokens
    of ``ids`` (perplexity = exp of it)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * length : (w + 1) * length + 1]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk], device=device)
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        total += float(loss)
        count += x.shape[1] - 1
    return total / count if count else math.nan
