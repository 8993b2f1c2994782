"""Held-out perplexity of a causal LM in both phases of generation, for ``attnlab eval``.

A window of ``n + 1`` held-out tokens is split into a prefill of ``n - m`` tokens (one forward pass: the
prefill method runs) and ``m`` teacher-forced decode steps of one token each after it (the decode method
runs, over the KV cache the prefill left). The prefill's logits predict tokens ``1 .. n - m``, the decode
steps' logits tokens ``n - m + 1 .. n``; the two losses (mean next-token cross-entropy in nats) are kept
apart, since a prefill-only method changes only the first and a decode-only method only the second.
Perplexity is ``exp(loss)``; deltas are taken against ``softmax`` run the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.functional import cross_entropy

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class PhaseLoss:
    """Summed cross-entropy (nats) and token counts of the prefill and decode parts of some windows."""

    prefill_nats: float
    prefill_tokens: int
    decode_nats: float
    decode_tokens: int

    @property
    def prefill_loss(self) -> float:
        return self.prefill_nats / self.prefill_tokens if self.prefill_tokens else math.nan

    @property
    def decode_loss(self) -> float:
        return self.decode_nats / self.decode_tokens if self.decode_tokens else math.nan


def windows(ids: Sequence[int], n: int, count: int) -> list[list[int]]:
    """Up to ``count`` consecutive, disjoint windows of ``n + 1`` tokens of ``ids`` (fewer when ``ids`` is
    short)."""
    if n < 2 or count < 0:
        raise ValueError(f"windows(n={n}, count={count}): expected n >= 2 and count >= 0")
    return [list(ids[i * (n + 1) : (i + 1) * (n + 1)]) for i in range(count) if (i + 1) * (n + 1) <= len(ids)]


#: one window's prefill, for reuse by runs whose prefill is the same: (summed nats, tokens, KV cache)
Prefill = tuple[float, int, Any]


@torch.no_grad()
def phase_loss(
    model: PreTrainedModel,
    wins: Sequence[Sequence[int]],
    decode_tokens: int,
    shared: Sequence[Prefill] | None = None,
    keep: list[Prefill] | None = None,
    before_window: Callable[[], None] | None = None,
) -> PhaseLoss:
    """The prefill and decode losses of ``model`` on ``wins`` (each ``n + 1`` tokens; see the module
    docstring), with ``decode_tokens`` teacher-forced decode steps per window (``1 <= m < n``).
    ``shared``: per window, the prefill of an earlier call with the same model and prefill attention (its
    cache is copied, never changed): the prefill is not run again. ``keep`` receives this call's prefills.
    ``before_window`` is called before each window (e.g. to clear a stateful method's state, which a
    shared prefill does not do)."""
    device = next(model.parameters()).device
    pre_nats = dec_nats = 0.0
    pre_count = dec_count = 0
    if shared is not None and len(shared) != len(wins):
        raise ValueError(f"shared holds {len(shared)} prefills for {len(wins)} windows")
    for i, win in enumerate(wins):
        n = len(win) - 1
        if not 1 <= decode_tokens < n:
            raise ValueError(
                f"decode_tokens={decode_tokens}: expected 1 <= decode_tokens < {n} (window length)"
            )
        p = n - decode_tokens
        x = torch.tensor([list(win)], device=device)
        if before_window is not None:
            before_window()
        if shared is not None:
            nats, count, cache = shared[i][0], shared[i][1], copy.deepcopy(shared[i][2])
        else:
            out = model(input_ids=x[:, :p], use_cache=True)
            nats = float(cross_entropy(out.logits[0].float(), x[0, 1 : p + 1], reduction="sum"))
            count, cache = p, out.past_key_values
            if keep is not None:
                keep.append((nats, count, copy.deepcopy(cache)))
        pre_nats += nats
        pre_count += count
        for t in range(p, n):
            out = model(input_ids=x[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            dec_nats += float(cross_entropy(out.logits[0, -1:].float(), x[0, t + 1 : t + 2], reduction="sum"))
            dec_count += 1
    return PhaseLoss(pre_nats, pre_count, dec_nats, dec_count)


def ppl_change(loss: float | None, dense: float | None) -> float | None:
    """``exp(loss - dense) - 1``: the relative perplexity change against dense (None when either is
    missing or NaN)."""
    if loss is None or dense is None or math.isnan(loss) or math.isnan(dense):
        return None
    return math.exp(loss - dense) - 1.0


def with_ppl_changes(methods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``methods`` rows of a result with ``prefill_ppl_change`` / ``decode_ppl_change`` against the
    ``softmax`` row of the same length."""
    rows = [dict(m) for m in methods]
    dense = {m["length"]: m for m in rows if m["method"] == "softmax"}
    for m in rows:
        ref = dense.get(m["length"], {})
        m["prefill_ppl_change"] = ppl_change(m.get("prefill_loss"), ref.get("prefill_loss"))
        m["decode_ppl_change"] = ppl_change(m.get("decode_loss"), ref.get("decode_loss"))
    return rows
