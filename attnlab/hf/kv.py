"""KV memory under attnlab.hf: eviction that frees the cache, and what each decode method keeps.

**Freeing evicted KV** (``attnlab.hf.use(model, ..., free_kv=True)``; opt-in, off by default). Two kinds
of decode methods drop tokens for good: the eviction methods, and the sink + window methods
(:data:`WINDOWED`: ``retrieval_heads_kv`` without retrieval heads, ``streaming``), whose dropped middle is
removed whenever a row holds more than sinks + window + :data:`SLACK` tokens (the kept sinks and window
are a superset of what later steps read, so outputs are unchanged). The
eviction methods (:data:`EVICTING`: ``snapkv``, ``h2o``) decide once, at their first call (in attnlab.hf
the first decode step: the prefill runs a prefill method), which prompt tokens each (batch, KV head)
keeps; without ``free_kv`` the cache keeps every token and the method only masks the rest. With
``free_kv``, right after that first decode call of a layer, the layer of transformers' ``DynamicCache``
is compacted in place: its ``keys``/``values`` become new tensors holding only the kept tokens (the old
ones are released), and later steps append to them and attend to all of them (exact attention over the
kept set, the same set the masking path attends to, in the same order).

Positions and masks stay right: RoPE is applied before caching (Llama, Qwen2/3, Mistral, Gemma, Phi-3),
so a kept key keeps its rotation; the compacted layer reports its *logical* length (physical + dropped)
through ``get_seq_length`` (and so ``get_mask_sizes`` / ``get_query_offset``), so transformers' position
ids and its 2-D padding mask keep counting every token ever seen; attnlab's attention function maps the
logical mask onto the physical cache of each compacted layer (:class:`Compaction`). Layers that do not
evict (another method there, or several methods in one layer) are left as they are, and the mask stays
consistent because every layer reports the logical length.

Batch > 1 with left padding: every row keeps ``min(budget, its real tokens)`` per KV head; rows that keep
fewer than the longest row are left-padded in the compacted tensor (``P - c_b`` padding slots, ``P`` the
largest count), which the runtime treats as that row's padding from then on. With equal-length rows there
is no padding and the batch runs as one call.

Only transformers' full-attention ``DynamicLayer`` is compacted (a static or sliding-window cache layer
raises :class:`~attnlab.hf.interface.HFRuntimeError`); beam search is refused under ``use`` with the
stateful (evicting) methods and runs with the stateless sink + window ones (the beams of a prompt keep the
same tokens, so a row's padding follows transformers' row reordering; tested). After a
layer is compacted, the 2-D ``attention_mask`` of later calls must mark every new token as real (what
``generate`` does): the runtime takes each row's padding from the compaction, not from later masks.
``free_kv`` is a ``use`` option only (``register`` installs no hook to compact with). ``h2o`` by default
decides once, like kvpress's press, so it frees once; ``h2o`` with ``per_step=True`` (the H2O paper's
loop) evicts at every decode step, and the layer is compacted after every step that dropped a token: its
cache tensors hold ``budget`` tokens per row between steps (``budget + 1`` inside a step, when the new
token is appended before the step evicts), the kept tokens' accumulated scores carried over re-indexed.

**KV memory report**: :func:`kv_memory` gives, per layer, the bytes the cache has allocated, the bytes the
decode method keeps (the tokens it can ever attend to again: an eviction method's kept set, a
sink + window head's sink and window, every token for exact attention and for the selection methods,
which may pick any token later) and the bytes it reads per decode step (selection methods: their budget;
tidal's full and selection layers: every token; recycled: a step between its full steps, whose full steps
read every token, and the tokens appended since the last full step not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnlab.state.eviction import EvictionState, StepEvictionState

if TYPE_CHECKING:
    from attnlab.hf.interface import CacheState, Runtime

#: decode methods whose dropped tokens ``free_kv`` removes from the cache
EVICTING: frozenset[str] = frozenset({"snapkv", "h2o"})
#: decode methods that may select any cached token at a later step (they keep the whole cache; their
#: ``budget`` is what a step reads)
SELECTING: frozenset[str] = frozenset({"page_topk", "tidal", "tokenselect", "recycled"})


@dataclass(frozen=True)
class Compaction:
    """A compacted cache layer: ``shift`` tokens fewer than transformers' logical length, and per batch row
    the physical index of its first real token (``starts``; None: no row has padding)."""

    shift: int
    starts: tuple[int, ...] | None
    kept: tuple[int, ...]  # per row, the tokens kept at compaction

    def runs(self, n_k: int) -> tuple[tuple[int, int], ...] | None:
        """Per row its real keys ``(start, n_k)`` in the physical cache of ``n_k`` tokens (None: all)."""
        return None if self.starts is None else tuple((s, n_k) for s in self.starts)


_CLASSES: dict[type, type] = {}


def _compacted_class(base: Any) -> type:
    """``base`` (transformers' DynamicLayer) with a logical length: ``dropped`` tokens more than it holds."""
    got = _CLASSES.get(base)
    if got is None:

        def get_seq_length(self: Any) -> int:
            return int(base.get_seq_length(self)) + int(self.dropped)

        def reset(self: Any) -> None:
            base.reset(self)
            self.dropped = 0

        got = type(f"Evicted{base.__name__}", (base,), {"get_seq_length": get_seq_length, "reset": reset})
        _CLASSES[base] = got
    return got


#: the sink + window methods whose evicted middle ``free_kv`` removes (retrieval_heads_kv only without
#: retrieval heads: a cache tensor has one length for all KV heads, and retrieval heads keep every token)
WINDOWED: frozenset[str] = frozenset({"retrieval_heads_kv", "streaming"})
#: a sink + window layer is compacted when a row holds more than its sinks + window + SLACK tokens (one
#: copy of the kept tokens every SLACK steps instead of every step)
SLACK = 64

Entries = list[tuple[tuple[int, ...] | None, int, int]]


def window_keep(name: str, params: Any) -> tuple[int, int] | None:
    """(sinks, recent tokens) a sink + window decode method attends to from now on, or None where it needs
    every token (retrieval heads) or is not a sink + window method. A superset of what the next step reads
    (its window slides by one token), so dropping the rest changes nothing."""
    if name == "retrieval_heads_kv" and not params.heads:
        return int(params.sink), int(params.budget) - int(params.sink)
    if name == "streaming":
        return int(params.sinks), int(params.window)
    return None


def _gather(runtime: Runtime, layer: int, cache_layer: Any, per_row: list[Tensor | None]) -> list[int]:
    """Keep, per batch row, the physical cache indices ``per_row[b]`` ((H_kv, c_b); None: nothing) of
    ``cache_layer``, left-padding rows that keep fewer than the most; record the :class:`Compaction`.
    Returns the kept counts per row."""
    from attnlab.hf.interface import HFRuntimeError

    cls = type(cache_layer)
    if getattr(cls, "is_sliding", False) or cls.__name__ not in ("DynamicLayer", "EvictedDynamicLayer"):
        raise HFRuntimeError(
            f"free_kv compacts transformers' full-attention DynamicLayer (DynamicCache); layer {layer} of this "
            f"cache is a {cls.__name__}: use the default dynamic cache, or free_kv=False"
        )
    keys, values = cache_layer.keys, cache_layer.values
    b, h_kv, n, _ = keys.shape
    counts = [0 if t is None else int(t.shape[1]) for t in per_row]
    p = max(counts)
    index = torch.zeros(b, h_kv, p, dtype=torch.long, device=keys.device)
    for row, t in enumerate(per_row):
        if t is not None and t.shape[1]:
            index[row, :, p - t.shape[1] :] = t
            index[row, :, : p - t.shape[1]] = t[
                :, :1
            ]  # padding slots: a copy of a kept token, never attended
    gather = index[..., None]
    cache_layer.keys = keys.gather(2, gather.expand(-1, -1, -1, keys.shape[3]))
    cache_layer.values = values.gather(2, gather.expand(-1, -1, -1, values.shape[3]))
    if cls.__name__ == "DynamicLayer":
        cache_layer.__class__ = _compacted_class(cls)
    cache_layer.dropped = int(getattr(cache_layer, "dropped", 0)) + n - p
    starts = tuple(p - c for c in counts)
    prev = runtime.compacted.get(layer)
    runtime.compacted[layer] = Compaction(
        (prev.shift if prev else 0) + n - p, starts if any(starts) else None, tuple(counts)
    )
    return counts


def compact(runtime: Runtime, layer: int, cache_layer: Any, entries: Entries) -> None:
    """Remove the tokens the eviction states of ``layer`` dropped from ``cache_layer`` (a DynamicLayer):
    ``entries`` lists the decode call's row groups (rows or None for the whole batch, and their run
    ``[s, e)`` of real keys). Replaces the layer's states by exact ones over the compacted cache (per-step
    states: the same kept tokens and scores, re-indexed to the compacted cache, one state per group of
    rows keeping as many tokens) and records the :class:`Compaction` the runtime maps masks with. A
    per-step call that dropped nothing leaves the cache as it is."""
    from attnlab.hf.interface import HFRuntimeError

    keys = cache_layer.keys
    b, h_kv = keys.shape[:2]
    per_row: list[Tensor | None] = [None] * b
    steps: dict[int, tuple[StepEvictionState, int]] = {}  # per row: its per-step state and row in it
    dropped = False
    for rows, s, e in entries:
        state = runtime.states.get((layer, 0, rows))
        if isinstance(state, StepEvictionState):
            dropped = dropped or int(state.kept.shape[2]) < e - s
            idx = state.kept.long() + s
            for j, row in enumerate(rows if rows is not None else range(b)):
                steps[row] = (state, j)
        elif isinstance(state, EvictionState):
            dropped = True
            idx = (
                torch.arange(s, e, device=keys.device).expand(len(rows) if rows else b, h_kv, -1)
                if state.kept is None
                else state.kept.long() + s
            )
        else:
            raise HFRuntimeError(f"layer {layer}: free_kv found no eviction state for rows {rows}")
        for j, row in enumerate(rows if rows is not None else range(b)):
            per_row[row] = idx[j]
    if not dropped:
        return
    counts = _gather(runtime, layer, cache_layer, per_row)
    for key in [k for k in runtime.states if k[0] == layer]:
        del runtime.states[key]
    groups: dict[int, list[int]] = {}
    for row, c in enumerate(counts):
        groups.setdefault(c, []).append(row)
    whole = runtime.compacted[layer].starts is None
    for c, rows_ in groups.items():
        key = (layer, 0, None if whole else tuple(rows_))
        if steps:  # per step (a row the call skipped, with no real token, keeps nothing)
            kept = torch.arange(c, device=keys.device, dtype=torch.int32).expand(len(rows_), h_kv, -1)
            none = torch.zeros(h_kv, c, device=keys.device)
            score = torch.stack([steps[r][0].score[steps[r][1]] if r in steps else none for r in rows_])
            seen = torch.stack([steps[r][0].seen[steps[r][1]] if r in steps else none for r in rows_])
            runtime.states[key] = StepEvictionState(kept.contiguous(), score, seen, c)
        else:
            runtime.states[key] = EvictionState(None, c)


def compact_window(
    runtime: Runtime, layer: int, cache_layer: Any, keep: tuple[int, int], entries: Entries
) -> None:
    """Keep, per row, its first ``keep[0]`` real tokens (sinks) and its last ``keep[1]`` (window) in
    ``cache_layer``; ``entries``: the decode call's row groups and their runs of real keys."""
    keys = cache_layer.keys
    b, h_kv = keys.shape[:2]
    sink, recent = keep
    per_row: list[Tensor | None] = [None] * b
    for rows, s, e in entries:
        if e - s <= sink + recent:
            idx = torch.arange(s, e, device=keys.device)
        else:
            idx = torch.cat(
                [
                    torch.arange(s, s + sink, device=keys.device),
                    torch.arange(e - recent, e, device=keys.device),
                ]
            )
        for row in rows if rows is not None else range(b):
            per_row[row] = idx.expand(h_kv, -1)
    _gather(runtime, layer, cache_layer, per_row)


@dataclass(frozen=True)
class LayerKV:
    """KV memory of one attention layer (bytes of keys and values, all batch rows and KV heads).

    - ``allocated``: what the cache tensors hold (padding and evicted-but-not-freed tokens included).
    - ``kept``: what the layer's decode method can ever attend to again (real tokens only): the tokens a
      cache that frees what the method dropped would hold.
    - ``read``: what one decode step attends to (a selection method's budget; otherwise ``kept``).
    - ``masked``: ``allocated - kept``: memory held for tokens the method only masks (or padding).
    """

    layer: int
    method: str
    tokens: int  # the layer's physical cache length (per row and KV head)
    allocated: int
    kept: int
    read: int
    freed: bool  # the layer was compacted (free_kv)

    @property
    def masked(self) -> int:
        return self.allocated - self.kept


def _kept_tokens(method: str, params: Any, kv_head: int, n: int, state: Any) -> tuple[int, int]:
    """(kept, read) tokens of one (row, KV head) with ``n`` real tokens under a decode method."""
    if isinstance(state, StepEvictionState) and state.length <= n:
        return state.kept_tokens(n), state.kept_tokens(n)
    if method in EVICTING:
        kept = state.kept_tokens(n) if isinstance(state, EvictionState) and state.prefix <= n else n
        return kept, kept
    if method == "retrieval_heads_kv":
        kept = n if kv_head in params.heads else min(params.budget, n)
        return kept, kept
    if method == "sliding_window":
        return min(params.window, n), min(params.window, n)
    if method == "streaming":
        kept = min(int(getattr(params, "sinks", 0)) + int(getattr(params, "window", n)), n)
        return kept, kept
    if method == "tidal" and params.role != "reuse":  # TidalDecode's full and selection layers read all
        return n, n
    if method in SELECTING and hasattr(params, "budget"):  # recycled: its steps between full steps
        return n, min(int(params.budget), n)
    if method == "softcap" and getattr(params, "window", None) is not None:
        return min(params.window, n), min(params.window, n)
    return n, n


def kv_memory(cache: Any, runtime: Runtime | None = None) -> list[LayerKV]:
    """Per attention layer of ``cache`` (a transformers ``DynamicCache``, e.g. ``generate(...,
    return_dict_in_generate=True).past_key_values``), the KV bytes allocated vs kept vs read per step
    (:class:`LayerKV`). ``runtime``: the :class:`~attnlab.hf.interface.Runtime` that ran the model
    (``with attnlab.hf.use(...) as rt``), whose plan, states and last padding give each layer's decode
    method and real tokens; without it every token counts as kept (plain transformers attention)."""
    from attnlab.hf.interface import CacheState, effective

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kv_memory takes a transformers Cache with .layers; got {type(cache).__name__}")
    # the runtime's state of this cache (its decode states, padding and compactions)
    own = (runtime.cache_state(cache) if runtime is not None else None) or CacheState()
    out = []
    for i, lay in enumerate(layers):
        keys, values = getattr(lay, "keys", None), getattr(lay, "values", None)
        if keys is None or values is None or keys.ndim != 4:
            continue
        b, h_kv, n, d = keys.shape
        per_token = d * keys.element_size() + values.shape[3] * values.element_size()
        allocated = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        method, params = "softmax", None
        heads: dict[int, tuple[str, Any, int]] = {}  # per KV head: method, params, its head group (part)
        if runtime is not None:
            info = runtime.info.layer(i) if runtime.info is not None else None
            window = info.sliding_window if info is not None else None
            cap = info.softcap if info is not None else None
            n_heads = runtime.info.num_heads if runtime.info is not None else h_kv
            group = max(1, n_heads // h_kv)
            parts: dict[Any, int] = {}  # the runtime's head groups, in head order (Runtime._build)
            for h in range(n_heads):
                ref, explicit = runtime.plan.method(i, h, "decode")
                eff = effective(ref, explicit, window, cap, runtime.plan, f"layer {i}, head {h}")
                part = parts.setdefault(eff, len(parts))
                heads.setdefault(h // group, (eff.name, eff.make_params(), part))
            names = sorted({m for m, _, _ in heads.values()})
            method = names[0] if len(names) == 1 else "+".join(names)
        last = own.last_runs.get(i)
        row_runs = last[1] if last is not None and last[0] == n else None
        kept = read = 0
        for row in range(b):
            real = n if row_runs is None else row_runs[row][1] - row_runs[row][0]
            for kv in range(h_kv):
                m, p, part = heads.get(kv, (method, params, 0))
                state = _row_state(own, i, part, row) if runtime is not None else None
                k_, r_ = _kept_tokens(m, p, kv, real, state)
                kept += k_
                read += r_
        freed = runtime is not None and i in own.compacted
        out.append(LayerKV(i, method, n, allocated, kept * per_token, read * per_token, freed))
    return out


def _row_state(own: CacheState, layer: int, part: int, row: int) -> Any:
    """The decode state of head group ``part`` of ``layer`` that covers batch ``row``."""
    for key, state in own.states.items():
        if len(key) == 3 and key[0] == layer and key[1] == part and (key[2] is None or row in key[2]):
            return state
    return None
