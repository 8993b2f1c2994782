"""The two functions transformers calls: the mask function (``AttentionMaskInterface``) and the attention
function (``AttentionInterface``), and the :class:`Runtime` that runs a plan's methods behind them.

The mask function returns an :class:`HFMask`, a small description of the mask rather than a dense tensor:
where the queries sit among the keys, and per sequence the run of keys the 2-D ``attention_mask`` keeps
(left padding). attnlab methods take no arbitrary mask, so a padded batch runs per sequence on its own
keys: sequence ``b`` with valid keys ``[s, e)`` runs on ``k[b, :, s:e]`` with the queries that sit in
that run, which is exactly what the causal mask with padding computes (relative positions are unchanged;
a sink is the sequence's first real token). Query rows that are padding get zeros. Sequences with the same
run share one call. Without padding a layer is one call per head group.

The attention function receives q (B, H, N_q, D), k/v (B, H_kv, N_k, D) after RoPE and the cache update,
chooses the phase (prefill: no cached keys before the queries; decode: otherwise), runs each head group's
method through a prepared :class:`attnlab.Op` and returns (B, N_q, H, D_v) as transformers expects.

With ``use(..., free_kv=True)`` a layer's cache may hold fewer tokens than transformers counts (evicted ones
removed, :mod:`attnlab.hf.kv`): the mask still describes the logical cache, and the runtime maps it onto the
layer's physical one (:class:`~attnlab.hf.kv.Compaction`: a shift, and each row's first real token).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from attnlab.api import Op, prepare
from attnlab.backends.base import Backend
from attnlab.core import Call, Problem
from attnlab.errors import AttnlabError
from attnlab.hf.kv import EVICTING, Compaction, Entries, window_keep
from attnlab.hf.models import SUPPORTED_ATTENTION, ModelInfo, UnsupportedModelError, info_from_module
from attnlab.hf.plan import PHASES, HFPlan, MethodRef, PlanError, check_method
from attnlab.registry import methods
from attnlab.settings import settings

#: Stateful methods whose state passes from layer to layer within a step (TidalDecode's selected positions:
#: each layer's call gets the state the previous layer's call returned, and a step starts with the state
#: the previous step ended with); every other stateful method keeps one state per layer.
SHARED_STATE: frozenset[str] = frozenset({"tidal"})
#: the tensor inputs of a bound decode step (attnlab.hf passes none: padding runs per sequence)
_NO_INPUTS: Mapping[str, Tensor] = {}


class HFRuntimeError(AttnlabError, RuntimeError):
    """A transformers call that attnlab.hf cannot run exactly (mask kind, cache layout, dropout, ...)."""


@dataclass(frozen=True)
class HFMask:
    """The attention mask of one forward pass, as attnlab.hf's mask function describes it.

    - ``q_start``: the key index of the first query (``q_offset - kv_offset``); query ``i`` sits at key
      index ``q_start + i`` and sees keys ``<= q_start + i`` (causal).
    - ``runs``: per sequence the keys the 2-D attention mask keeps, ``(start, end)`` (one contiguous run,
      as left padding makes it); None when every key is kept.
    - ``local_size``: the sliding window transformers built this mask for (None: full causal).
    """

    batch: int
    q_length: int
    kv_length: int
    q_start: int
    runs: tuple[tuple[int, int], ...] | None = None
    local_size: int | None = None
    kv_offset: int = 0

    # transformers and user code sometimes read .shape / .dtype / .device of a mask; none of them does
    # arithmetic on it here, and attnlab's attention function is the only consumer.
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)

    # generation with a compileable cache (StaticCache) builds the mask once in prepare_inputs_for_generation,
    # calls .contiguous() on it and hands it to the model, which passes a mask of ndim 4 through unchanged
    ndim = 4

    def contiguous(self) -> HFMask:
        return self


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    local_size: int | None = None,
    **kwargs: Any,
) -> HFMask:
    """transformers' mask interface (same keywords as ``masking_utils.sdpa_mask``): returns an
    :class:`HFMask`. Reads the 2-D padding mask once per forward pass (one host synchronisation when a
    padding mask is given). Custom mask functions (``or_mask_function`` / ``and_mask_function``, e.g. for
    image tokens) are refused: attnlab methods define their own masks."""
    if use_vmap:
        raise HFRuntimeError(
            "the model asked for a custom mask function (or_mask_function / and_mask_function, e.g. bidirectional "
            "image tokens); attnlab.hf runs causal language models whose mask is causal (optionally sliding) "
            "with padding only"
        )
    if isinstance(attention_mask, HFMask):  # made by generate() for a compileable cache (see HFMask.ndim)
        if (attention_mask.batch, attention_mask.q_length, attention_mask.kv_length) != (
            batch_size, q_length, kv_length,
        ):  # fmt: skip
            raise HFRuntimeError(
                f"attnlab.hf got a prepared mask for {attention_mask.shape} but the model asks for batch "
                f"{batch_size}, {q_length} queries x {kv_length} keys"
            )
        return attention_mask
    q_start = int(q_offset) - int(kv_offset)  # a StaticCache gives q_offset as a tensor: a host sync
    if q_start == 0 and mask_function is not None:
        _refuse_other_masks(
            mask_function, batch_size, q_length, kv_offset, kv_length, local_size, kwargs, attention_mask
        )
    runs = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise HFRuntimeError(
                f"attnlab.hf takes a 2-D attention_mask (batch, keys) of padding; got shape "
                f"{tuple(attention_mask.shape)}"
            )
        pad = attention_mask.to(torch.bool)
        need = kv_offset + kv_length - pad.shape[1]
        if need > 0:  # like transformers' prepare_padding_mask: keys beyond the 2-D mask are not kept
            pad = torch.nn.functional.pad(pad, (0, need))
        pad = pad[:, kv_offset : kv_offset + kv_length]
        if not bool(pad.all()):
            runs = _runs(pad)
    return HFMask(batch_size, q_length, kv_length, q_start, runs, local_size, int(kv_offset))


def _refuse_other_masks(
    fn: Any, batch: int, q_length: int, kv_offset: int, kv_length: int, local_size: int | None,
    kwargs: Mapping[str, Any], attention_mask: Tensor | None,
) -> None:  # fmt: skip
    """Refuse a prefill whose mask function is not the causal (or sliding-window) rule attnlab's methods
    apply, e.g. transformers' packed sequences (``position_ids`` restarting inside a row, no cache, no padding
    mask): its last query row is evaluated and compared with the causal row (one host synchronisation, in
    prefill only). transformers' plain causal function is known and skipped."""
    from transformers import masking_utils

    if fn is masking_utils.causal_mask_function:
        return
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else "cpu")
    q_last = torch.tensor(kv_offset + q_length - 1, device=device)
    kv = kv_offset + torch.arange(kv_length, device=device)[None, :]
    want = kv <= q_last
    if local_size is not None:
        want = want & (kv > q_last - local_size)
    got = torch.as_tensor(fn(torch.arange(batch, device=device)[:, None], 0, q_last, kv), device=device)
    if not bool((got.expand(batch, kv_length) == want).all()):
        raise HFRuntimeError(
            "the model asked for a mask other than causal"
            + (f" with a sliding window of {local_size}" if local_size is not None else "")
            + " (e.g. packed sequences: position_ids that restart inside a row); attnlab.hf's methods apply "
            "the causal rule with left padding only: pass one sequence per row with a 2-D attention_mask"
        )


def _refuse_past_the_window(layer: int, parts: Sequence[Part], window: int | None, kv_offset: int) -> None:
    """A layer whose cache dropped its first ``kv_offset`` keys (transformers' sliding-window cache layer keeps
    the model's window only) runs only the model's own window there: a method the plan runs in place of the
    window would silently see the window's keys alone."""
    own = all(
        p.ref.name in ("sliding_window", "softcap") and p.ref.kwargs.get("window") == window for p in parts
    )
    if not own:
        names = ", ".join(sorted({p.ref.name for p in parts}))
        raise HFRuntimeError(
            f"layer {layer}: the KV cache keeps only the model's sliding window of {window} tokens (it dropped "
            f"the first {kv_offset}), but the plan runs {names} there in place of the window, which would see "
            "the window's keys alone: pass past_key_values=transformers.DynamicCache() (a cache that keeps "
            "every token) to generate, or keep the model's window on this layer"
        )


def _runs(pad: Tensor) -> tuple[tuple[int, int], ...]:
    """Per row, the (start, end) of its True entries, which must be contiguous."""
    n = pad.shape[1]
    count = pad.sum(1)
    first = pad.to(torch.int8).argmax(1)
    last = n - 1 - pad.flip(1).to(torch.int8).argmax(1)
    rows = torch.stack([count, first, last], 1).tolist()
    out = []
    for b, (c, s, e) in enumerate(rows):
        if c == 0:
            out.append((0, 0))
        elif c != e - s + 1:
            raise HFRuntimeError(
                f"sequence {b} of the batch has an attention_mask with holes (kept keys {s}..{e}, {c} of them); "
                "attnlab.hf needs each sequence's kept keys to be one contiguous run: use left padding "
                "(tokenizer.padding_side = 'left')"
            )
        else:
            out.append((s, e + 1))
    return tuple(out)


@dataclass
class Bound:
    """A decode part's resolved call and backend for one call signature *except* the cache length, which
    grows by one token per step (the op's own cache keys on every shape, so each step would re-validate
    and re-dispatch): ``sig`` is everything else the op validated."""

    sig: tuple[Any, ...]
    call: Call
    backend: Backend


def _signature(q: Tensor, k: Tensor, v: Tensor) -> tuple[Any, ...]:
    """What a decode step's validation depends on besides N_k (q's shape, k/v without their length, dtypes,
    devices, the settings' generation)."""
    ks, vs = k.shape, v.shape
    return (
        q.shape, ks[0], ks[1], ks[3], vs[0], vs[1], vs[3], q.dtype, k.dtype, v.dtype, q.device, k.device,
        v.device, settings.generation,
    )  # fmt: skip


@dataclass
class Part:
    """The query heads of a layer that run one method in one phase."""

    heads: tuple[int, ...] | None  # None: every head
    kv_heads: tuple[int, ...] | None
    ref: MethodRef
    op: Op
    #: where the state of a stateful method lives: per layer, or shared by the layers (see SHARED_STATE)
    shared_state: bool = False
    _index: dict[torch.device, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: per batch-row group, the decode step bound to its resolved call (see :meth:`Runtime._step`)
    _bound: dict[tuple[int, ...] | None, Bound] = field(default_factory=dict)

    def index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        got = self._index.get(device)
        if got is None:
            assert self.heads is not None and self.kv_heads is not None
            got = (torch.tensor(self.heads, device=device), torch.tensor(self.kv_heads, device=device))
            self._index[device] = got
        return got


def effective(
    ref: MethodRef, explicit: bool, window: int | None, cap: float | None, plan: HFPlan, where: str
) -> MethodRef:
    """The method a head runs given the layer's model window and soft cap (see :mod:`attnlab.hf.plan`).

    A soft-capped layer runs ``softmax`` as ``softcap`` with the model's cap, and a sliding window there
    (the model's, kept, or a ``sliding_window`` the plan names) as ``softcap`` with that ``window``: Gemma
    2/3's sliding layers keep both the window and the cap. A ``softcap`` the plan names there gets the
    model's cap, and on a sliding layer (``"sliding": "keep"``) the model's window, where it gives none."""
    if window is not None and plan.sliding == "keep" and (not explicit or ref.name == "softmax"):
        ref = MethodRef("sliding_window", (("window", int(window)),))
    if cap is None:
        return ref
    if ref.name in ("softmax", "sliding_window"):
        if "softcap" not in methods():
            raise PlanError(
                f"{where}: the model soft-caps attention logits at {cap} (attn_logit_softcapping), which needs "
                "the method 'softcap', not registered in this process; register it with "
                "attnlab.registry.register(attnlab.catalog.variants.softcap.SPEC)"
            )
        params: tuple[tuple[str, Any], ...] = (("cap", float(cap)),)
        if ref.name == "sliding_window":
            params += (("window", int(ref.make_params().window)),)  # type: ignore[attr-defined]
        return MethodRef("softcap", params)
    if ref.name == "softcap":  # the model's own function named: its cap and window where the plan gives none
        given = ref.kwargs
        extra: tuple[tuple[str, Any], ...] = () if "cap" in given else (("cap", float(cap)),)
        if window is not None and plan.sliding == "keep" and "window" not in given:
            extra += (("window", int(window)),)
        return MethodRef(ref.name, ref.params + extra) if extra else ref
    if plan.softcap == "drop":
        return ref
    raise PlanError(
        f"{where}: the model soft-caps attention logits at {cap} (attn_logit_softcapping), which method "
        f"{ref.name!r} cannot do; use 'softmax' (runs as 'softcap') there, or set the plan's 'softcap': 'drop' "
        "to run it without the cap (a different function)"
    )


def groups(
    plan: HFPlan, layer: int, phase: str, heads: int, window: int | None, cap: float | None, cls: str = ""
) -> dict[MethodRef, list[int]]:
    """The query heads of ``layer`` per method they run in ``phase`` (the model's window and cap applied;
    in head order): the runtime's head groups (:class:`Part`). Raises :class:`PlanError` for a method that
    cannot run there (``cls``: the attention class, for the message)."""
    out: dict[MethodRef, list[int]] = {}
    for h in range(heads):
        ref, explicit = plan.method(layer, h, phase)
        where = f"layer {layer}{f' ({cls})' if cls else ''}, head {h}, {phase}"
        eff = effective(ref, explicit, window, cap, plan, where)
        check_method(eff, phase, where)
        out.setdefault(eff, []).append(h)
    return out


def part_kv_heads(hs: Sequence[int], heads: int, kv_heads: int) -> tuple[int, ...] | None:
    """The model's KV head of each KV head a head group ``hs`` gets (None: every head, every KV head): whole
    KV groups keep GQA (one entry per KV head); where the heads of one KV group run different methods, each
    query head gets a copy of its KV head (one entry per query head)."""
    if len(hs) == heads:
        return None
    group = heads // kv_heads
    kv_groups = sorted({h // group for h in hs})
    return tuple(kv_groups) if len(hs) == len(kv_groups) * group else tuple(h // group for h in hs)


def local_heads(ref: MethodRef, hs: Sequence[int], heads: int, kv_heads: int, where: str) -> MethodRef:
    """``ref`` as the head group ``hs`` runs it: ``retrieval_heads_kv``'s ``heads`` name the model's KV
    heads, while the group's call gets only its own KV heads (:func:`part_kv_heads`), numbered from 0; they
    are renumbered to those positions. Raises :class:`PlanError` for a KV head the model lacks or that no
    query head of the group uses."""
    if ref.name != "retrieval_heads_kv":
        return ref
    named = tuple(getattr(ref.make_params(), "heads", ()))
    bad = [h for h in named if h >= kv_heads]
    if bad:
        raise PlanError(
            f"{where}: retrieval_heads_kv heads={named} names KV head {bad[0]}, but the model has {kv_heads} KV "
            f"heads (0..{kv_heads - 1}); retrieval heads are the model's KV heads (query head h uses KV head "
            f"h // {heads // kv_heads})"
        )
    kv = part_kv_heads(hs, heads, kv_heads)
    if kv is None or not named:
        return ref
    outside = [h for h in named if h not in kv]
    if outside:
        raise PlanError(
            f"{where}: retrieval_heads_kv heads={named} names KV head {outside[0]}, which none of the query heads "
            f"{_span(hs)} that run it uses (they use KV heads {', '.join(map(str, sorted(set(kv))))}); name "
            "the model's KV heads of these query heads"
        )
    local = tuple(j for j, h in enumerate(kv) if h in named)
    return MethodRef(ref.name, tuple((k, local if k == "heads" else v) for k, v in ref.params))


def _span(hs: Sequence[int]) -> str:
    """Head indices as a plan writes them ("4-7" for a run, else a list)."""
    if len(hs) > 1 and list(hs) == list(range(hs[0], hs[0] + len(hs))):
        return f"{hs[0]}-{hs[-1]}"
    return ", ".join(map(str, hs))


def check_plan(plan: HFPlan, info: ModelInfo) -> list[str]:
    """Check ``plan`` against the model: layers and heads it has, and for every layer, head and phase the
    method that will run there (after the model's sliding window and soft cap are applied; retrieval heads
    that are KV heads of the model and of their query heads). Raises
    :class:`~attnlab.hf.plan.PlanError` before anything runs. Returns the stateful methods the plan runs."""
    top = max(layer.index for layer in info.layers) + 1
    plan.check(top, info.num_heads)
    stateful: set[str] = set()
    tidal_roles: set[str] = set()
    for layer in info.layers:
        for phase in PHASES:
            for eff, hs in groups(
                plan, layer.index, phase, info.num_heads, layer.sliding_window, layer.softcap, layer.cls
            ).items():
                where = f"layer {layer.index} ({layer.cls}), heads {_span(hs)}, {phase}"
                local_heads(eff, hs, info.num_heads, info.num_kv_heads, where)
                if eff.spec().stateful:
                    stateful.add(eff.name)
                if eff.name == "tidal" and phase == "decode":
                    tidal_roles.add(str(eff.kwargs.get("role", "reuse")))
    if tidal_roles and "select" not in tidal_roles:
        raise PlanError(
            f"the plan runs 'tidal' (roles {', '.join(sorted(tidal_roles))}) on no layer with role 'select': its "
            "'reuse' layers would have no selection to reuse and attend to every token; give one or a few "
            "layers role 'select', e.g. {'layers': {2: {'decode': {'method': 'tidal', 'params': {'role': "
            "'select'}}}}}"
        )
    return sorted(stateful)


def model_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a transformers layer passes to its attention module: ``cache=`` from transformers 5.24
    on, ``past_key_values=`` before (None when neither is given)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


V = TypeVar("V")


class ByIdentity(Generic[V]):
    """Values keyed by objects' identity that hold the objects weakly: an entry goes when its object is
    collected, so that a runtime never keeps a KV cache or a model alive, and an object born at a dead
    one's address never finds the dead one's value."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Any], V]] = {}

    def get(self, obj: Any) -> V | None:
        got = self._items.get(id(obj))
        return got[1] if got is not None and got[0]() is obj else None

    def set(self, obj: Any, value: V) -> None:
        key, me = id(obj), weakref.ref(self)

        def gone(ref: weakref.ref[Any]) -> None:
            owner = me()
            entry = owner._items.get(key) if owner is not None else None
            if owner is not None and entry is not None and entry[0] is ref:
                del owner._items[key]

        self._items[key] = (weakref.ref(obj, gone), value)

    def pop(self, obj: Any) -> V | None:
        got = self.get(obj)
        if got is not None:
            del self._items[id(obj)]
        return got

    def values(self) -> list[V]:
        return [v for _, v in self._items.values()]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class CacheState:
    """What a :class:`Runtime` keeps for one KV cache (see :meth:`Runtime.forward`): the stateful methods'
    ``states``, the layers ``compacted`` by ``free_kv`` and those ``pending`` compaction, per layer the
    physical length and padding runs of its ``last_runs`` call, and per layer the tokens (logical, evicted
    ones included) its last call ended with (``lengths``: a call that starts before that is a new sequence
    on this cache, a prefill or a cropped cache, and clears the rest)."""

    states: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    compacted: dict[int, Compaction] = field(default_factory=dict)
    pending: dict[int, tuple[tuple[int, int] | bool, Entries]] = field(default_factory=dict)
    last_runs: dict[int, tuple[int, tuple[tuple[int, int], ...] | None]] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.states.clear()
        self.compacted.clear()
        self.pending.clear()
        self.last_runs.clear()
        self.lengths.clear()


def _owner(module: nn.Module) -> Any:
    """What identifies the model of an attention module: its config (shared by a model's layers)."""
    cfg = getattr(module, "config", None)
    return module if cfg is None else cfg


class Runtime:
    """Runs a plan inside a model: the attention function, per-layer caches of prepared ops, and the
    per-layer state of stateful (decode) methods, kept per KV cache.

    The decode state belongs to the KV cache it was computed on (a :class:`CacheState` per cache, dropped
    when the cache is collected: the runtime refers to caches weakly): two caches stepped in turn, or two
    models under one registered runtime, never read each other's. The runtime learns each call's cache from a forward pre-hook on the
    attention modules (:meth:`watch`: ``use`` installs it on every attention module, ``register`` on a
    module's first call; a call whose cache it was not told, a registered module's first, keeps its state
    for the model until the model's next call names its cache, which takes it over). A call that starts
    before the tokens the cache's last call of that layer ended with (a new prefill, a cropped cache) starts
    the cache's state over.

    ``states`` maps (layer, head group, batch rows) to the state a stateful method returned last (for the
    methods of :data:`SHARED_STATE`: (method, heads, batch rows), shared by the layers), for the cache of the
    last call (readable after that cache is gone, until the next call; :meth:`cache_state` gives any live
    cache's). Decode methods apply their own budget rule (a budget >= the cached keys runs exact attention
    and still updates the state). ``calls`` counts (layer, phase, method) of the calls made.
    """

    def __init__(self, plan: HFPlan, info: ModelInfo | None = None) -> None:
        self.plan = plan
        self.info = info
        self.calls: Counter[tuple[int, str, str]] = Counter()
        self._parts: dict[tuple[Any, ...], list[Part]] = {}
        #: the attention modules checked against the plan (per module: one registered runtime may serve
        #: several models), and the models (by their attention modules' config) checked with check_plan
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._models: ByIdentity[bool] = ByIdentity()
        #: decode steps of stateful methods skip the op's per-shape validation (see :meth:`_step`)
        self.bind_decode = True
        #: remove what eviction methods drop from the cache (set by ``use(..., free_kv=True)``; see
        #: :mod:`attnlab.hf.kv`)
        self.free_kv = False
        #: per KV cache its state; calls without a cache; calls whose cache the runtime was not told (per
        #: model config); the state of the last call
        self._caches: ByIdentity[CacheState] = ByIdentity()
        self._no_cache = CacheState()
        self._untold: ByIdentity[CacheState] = ByIdentity()
        self._current = self._no_cache
        #: the cache the watched attention module about to call the runtime was given (module id, a weak
        #: reference to the cache or None), set by the pre-hook of :meth:`watch`
        self._next: tuple[int, weakref.ref[Any] | None] | None = None
        self._hooks: list[Any] = []

    # -- the state of each cache -----------------------------------------------------------------------

    @property
    def states(self) -> dict[tuple[Any, ...], Any]:
        """The stateful methods' states of the last call's cache."""
        return self._current.states

    @property
    def compacted(self) -> dict[int, Compaction]:
        """The layers of the last call's cache compacted by ``free_kv`` (:mod:`attnlab.hf.kv`)."""
        return self._current.compacted

    @property
    def last_runs(self) -> dict[int, tuple[int, tuple[tuple[int, int], ...] | None]]:
        """Per layer of the last call's cache, the physical length and per-row runs of real keys of its last
        call."""
        return self._current.last_runs

    @property
    def _pending(self) -> dict[int, tuple[tuple[int, int] | bool, Entries]]:
        """The layers of the last call's cache whose eviction state was just decided (compacted by use()'s
        hook after the attention module returns)."""
        return self._current.pending

    def cache_state(self, cache: Any) -> CacheState | None:
        """The state this runtime keeps for ``cache`` (None: no call ran on it, or it was reset)."""
        return self._caches.get(cache)

    def reset(self, cache: Any = None) -> None:
        """Forget the stateful methods' state (a new prefill, or a call on a cache that shrank, does this
        itself for its cache): of ``cache`` only where given, else of every cache."""
        if cache is not None:
            got = self._caches.get(cache)
            if got is not None:
                got.clear()
            return
        for state in (*self._caches.values(), *self._untold.values(), self._no_cache):
            state.clear()
        self._caches.clear()
        self._untold.clear()

    def watch(self, module: nn.Module) -> None:
        """Learn the cache of each call of the attention ``module`` (a forward pre-hook; :meth:`unwatch`
        removes them)."""
        self._hooks.append(module.register_forward_pre_hook(self._note, with_kwargs=True))

    def unwatch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._next = None

    def _note(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        cache = model_cache(kwargs)
        self._next = (id(module), None if cache is None else weakref.ref(cache))

    def _state_of(self, module: nn.Module) -> CacheState:
        """The state of the cache of this call of ``module``."""
        told, self._next = self._next, None
        if told is not None and told[0] == id(module):
            if told[1] is None:
                return self._no_cache
            cache = told[1]()
            if cache is not None:
                got = self._caches.get(cache)
                if got is None:  # a new cache (taking over what its model's untold first calls kept)
                    got = self._untold.pop(_owner(module)) or CacheState()
                    self._caches.set(cache, got)
                return got
        owner = _owner(module)
        got = self._untold.get(owner)
        if got is None:
            got = CacheState()
            self._untold.set(owner, got)
        return got

    # -- plan resolution -------------------------------------------------------------------------------

    def parts(
        self, layer: int, phase: str, heads: int, kv_heads: int, window: int | None, cap: float | None,
        scale: float | None,
    ) -> list[Part]:  # fmt: skip
        """The head groups of ``layer`` in ``phase`` with their prepared ops (cached)."""
        key = (layer, phase, heads, kv_heads, window, cap, scale)
        got = self._parts.get(key)
        if got is None:
            got = self._build(layer, phase, heads, kv_heads, window, cap, scale)
            self._parts[key] = got
        return got

    def _build(
        self, layer: int, phase: str, heads: int, kv_heads: int, window: int | None, cap: float | None,
        scale: float | None,
    ) -> list[Part]:  # fmt: skip
        out = []
        for ref, hs in groups(self.plan, layer, phase, heads, window, cap).items():
            backend = self.plan.backends.get(ref.name)
            where = f"layer {layer}, heads {_span(hs)}, {phase}"
            run = local_heads(ref, hs, heads, kv_heads, where)  # retrieval heads: the part's own KV heads
            op = prepare(run.name, causal=True, scale=scale, backend=backend, **run.kwargs)
            shared = ref.name in SHARED_STATE
            kv = part_kv_heads(hs, heads, kv_heads)
            out.append(Part(None if kv is None else tuple(hs), kv, ref, op, shared))
        return out

    # -- the attention function ------------------------------------------------------------------------

    def forward(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """transformers' attention function: q (B, H, N_q, D), k/v (B, H_kv, N_k, D) -> ((B, N_q, H, D_v),
        None)."""
        layer = int(getattr(module, "layer_idx", 0) or 0)
        if module not in self._checked:
            self._check_module(module)
            self._checked.add(module)
        if dropout and module.training:
            raise HFRuntimeError(
                f"attention dropout {dropout} in training mode: attnlab methods have no dropout; call model.eval()"
            )
        cs = self._current = self._state_of(module)
        b, heads, n_q, _ = query.shape
        n_k = key.shape[2]
        rec = cs.compacted.get(layer)
        # where the queries start among the tokens the cache has seen (evicted ones included): before the
        # end of this layer's last call on this cache is a new sequence (a prefill, a cropped cache)
        if isinstance(attention_mask, HFMask):
            start = attention_mask.kv_offset + attention_mask.q_start
        else:
            start = n_k - n_q + (rec.shift if rec is not None else 0)
        if start < cs.lengths.get(layer, 0):
            cs.clear()  # earlier state belongs to another sequence
            rec = None
        cs.lengths[layer] = start + n_q
        runs = None
        if rec is not None and isinstance(attention_mask, HFMask) and attention_mask.q_start > 0:
            # a compacted layer (free_kv): transformers counts logical tokens, the cache holds fewer
            if attention_mask.q_length != n_q or attention_mask.kv_length - rec.shift != n_k:
                raise HFRuntimeError(
                    f"layer {layer}: the mask describes {attention_mask.q_length} queries x "
                    f"{attention_mask.kv_length} keys, {rec.shift} of them evicted (free_kv), but the attention "
                    f"call has {n_q} x {n_k}"
                )
            q_start, runs = attention_mask.q_start - rec.shift, rec.runs(n_k)
        elif rec is not None and attention_mask is None:
            q_start, runs = n_k - n_q, rec.runs(n_k)
        elif isinstance(attention_mask, HFMask):
            if attention_mask.q_length != n_q or attention_mask.kv_length != n_k:
                raise HFRuntimeError(
                    f"layer {layer}: the mask describes {attention_mask.q_length} queries x "
                    f"{attention_mask.kv_length} keys but the attention call has {n_q} x {n_k}; this cache "
                    "layout (e.g. a static sliding-window cache) is not supported: use the default DynamicCache"
                )
            q_start, runs = attention_mask.q_start, attention_mask.runs
        elif attention_mask is None:
            q_start = n_k - n_q
        else:
            raise HFRuntimeError(
                f"layer {layer}: attnlab.hf got a materialised attention mask ({type(attention_mask).__name__} "
                f"of shape {tuple(getattr(attention_mask, 'shape', ()))}); pass a 2-D padding attention_mask and let "
                "the model build its mask under attnlab.hf.use"
            )
        visible = q_start + n_q  # keys any query can see (a static cache has empty slots after them)
        if visible < n_k:
            key, value = key[:, :, :visible], value[:, :, :visible]
        phase = "prefill" if q_start == 0 else "decode"
        parts = self.parts(layer, phase, heads, key.shape[1], sliding_window, softcap, scaling)
        if isinstance(attention_mask, HFMask) and attention_mask.kv_offset > 0:
            _refuse_past_the_window(layer, parts, sliding_window, attention_mask.kv_offset)
        cs.last_runs[layer] = (key.shape[2], runs)
        free = self._free(layer, phase, parts)
        if runs is None:
            out = self._run(parts, layer, phase, query, key, value, None)
            if free:
                cs.pending[layer] = (free, [(None, 0, key.shape[2])])
        else:
            out = query.new_zeros(b, heads, n_q, value.shape[3])
            by_run: dict[tuple[int, int, int, int], list[int]] = {}
            for row, (s, e) in enumerate(runs):
                e = min(e, visible)
                i0, i1 = max(0, s - q_start), e - q_start
                if i1 > i0 and e > s:
                    by_run.setdefault((s, e, i0, i1), []).append(row)
            for (s, e, i0, i1), rows in by_run.items():
                if len(rows) == b:
                    q_, k_, v_ = query[:, :, i0:i1], key[:, :, s:e], value[:, :, s:e]
                else:
                    idx = torch.tensor(rows, device=query.device)
                    q_, k_, v_ = query[idx, :, i0:i1], key[idx, :, s:e], value[idx, :, s:e]
                res = self._run(parts, layer, phase, q_, k_, v_, tuple(rows))
                if len(rows) == b:
                    out[:, :, i0:i1] = res
                else:
                    out[idx, :, i0:i1] = res
            if free:
                cs.pending[layer] = (free, [(tuple(rows), s, e) for (s, e, _, _), rows in by_run.items()])
        return out.transpose(1, 2).contiguous(), None

    def _free(self, layer: int, phase: str, parts: Sequence[Part]) -> tuple[int, int] | bool | None:
        """What ``free_kv`` does after this call (:mod:`attnlab.hf.kv`): True: compact to the eviction
        state about to be decided (every decode call of an eviction method that evicts per step, e.g.
        ``h2o`` with ``per_step``); (sinks, window): drop the middle if the cache outgrew them (checked after
        the call); False / None: nothing."""
        if not self.free_kv or phase != "decode" or len(parts) != 1 or parts[0].heads is not None:
            return None
        ref = parts[0].ref
        if ref.name in EVICTING:
            if getattr(parts[0].op.params, "per_step", False):
                return True
            return layer not in self.compacted and not any(k[0] == layer for k in self.states)
        return window_keep(ref.name, parts[0].op.params)

    def _run(
        self, parts: Sequence[Part], layer: int, phase: str, q: Tensor, k: Tensor, v: Tensor,
        rows: tuple[int, ...] | None,
    ) -> Tensor:  # fmt: skip
        if len(parts) == 1 and parts[0].heads is None:
            return self._run_part(parts[0], 0, layer, phase, q, k, v, rows)
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        for i, part in enumerate(parts):
            qi, ki = part.index(q.device)
            out[:, qi] = self._run_part(part, i, layer, phase, q[:, qi], k[:, ki], v[:, ki], rows)
        return out

    def _run_part(
        self, part: Part, i: int, layer: int, phase: str, q: Tensor, k: Tensor, v: Tensor,
        rows: tuple[int, ...] | None,
    ) -> Tensor:  # fmt: skip
        op = part.op
        self.calls[(layer, phase, op.spec.name)] += 1
        if not op.spec.stateful:
            return op(q, k, v)  # type: ignore[return-value]
        skey = (part.ref.name, part.heads, rows) if part.shared_state else (layer, i, rows)
        state = self.states.get(skey)
        bound = self._step(part, rows, q, k, v) if phase == "decode" and self.bind_decode else None
        if bound is not None:
            out, self.states[skey] = bound.backend.run_state(q, k, v, bound.call, _NO_INPUTS, state)
            return out
        res = op(q, k, v, state=state)
        self.states[skey] = res.state  # type: ignore[union-attr]
        return res.out  # type: ignore[union-attr]

    def _step(
        self, part: Part, rows: tuple[int, ...] | None, q: Tensor, k: Tensor, v: Tensor
    ) -> Bound | None:
        """The bound decode step of ``part`` for these inputs, or None where the op must run as called.

        A decode step differs from the previous one only in the cache length N_k. The op validates and
        dispatches on every new shape (q, k, v checks, pattern, backend refusals), which at one token per
        step is most of a step's host time. Here a part's call is resolved by the op once per signature
        (:func:`_signature`: every shape but N_k, dtypes, devices, grad mode, settings, and whether
        N_k > N_q, the pattern), then only N_k is updated. Taken only for backends whose refusals cannot
        depend on N_k (``length_free_refusals``; the decode methods' executors) and when the op returns a
        plain output (no NaN check, lse or plan asked for)."""
        op = part.op
        if (
            op.return_lse
            or op.return_plan
            or op.check_finite
            or (op.check_finite is None and settings.check_finite)
        ):
            return None
        n_k = k.shape[2]
        if v.shape[2] != n_k or torch.compiler.is_compiling():
            return None  # the op's own validation says what is wrong
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        sig = (_signature(q, k, v), grad, n_k > q.shape[2])
        bound = part._bound.get(rows)
        if bound is None or bound.sig != sig:
            call, backend = op.resolve(q, k, v)
            if not backend.length_free_refusals:
                return None
            bound = Bound(sig, call, backend)
            part._bound[rows] = bound
        elif bound.call.problem.n_k != n_k:
            c, p = bound.call, bound.call.problem
            problem = Problem(p.batch, p.heads, p.kv_heads, p.n_q, n_k, p.head_dim, p.v_dim, p.causal, p.dtype,
                              p.device, p.requires_grad)  # fmt: skip
            bound.call = Call(c.spec, c.params, problem, c.scale, c.want_lse)
        return bound

    def _check_module(self, module: nn.Module) -> None:
        name = type(module).__name__
        if name not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attnlab.hf was called by the attention class {name}, which it does not support; supported "
                f"attention classes: {', '.join(SUPPORTED_ATTENTION)}"
            )
        if self.info is None:  # registered globally: check the plan against each model on its first call
            owner = _owner(module)
            if self._models.get(owner) is None:
                info = info_from_module(module)
                if info is not None:
                    check_plan(self.plan, info)
                else:  # no config to read the model from: its layer and head counts where it has them
                    cfg = getattr(module, "config", None)
                    layers, heads = (
                        getattr(cfg, "num_hidden_layers", None),
                        getattr(cfg, "num_attention_heads", None),
                    )
                    self.plan.check(layers, heads)
                self._models.set(owner, True)
            self.watch(module)  # (from its next call on: this call's cache is not told)
