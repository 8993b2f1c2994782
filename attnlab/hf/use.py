"""``attnlab.hf.use(model, ...)``: run a transformers causal LM on attnlab methods for a ``with`` block;
``attnlab.hf.register()``: make ``attn_implementation="attnlab"`` available to transformers.

Nothing is registered or patched at import. ``use`` registers an attention function and its mask function
under a fresh name, points the model's configs at it, and in ``finally`` (also when the block raises)
removes both entries and restores every config's ``_attn_implementation``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from attnlab.hf.interface import HFRuntimeError, Runtime, check_plan, mask_function, model_cache
from attnlab.hf.kv import SLACK, compact, compact_window
from attnlab.hf.models import attention_modules, inspect_model
from attnlab.hf.plan import HFPlan, PlanError, load_plan

#: transformers releases this integration is tested with (the GPU machine has 5.17; CI 5.23)
TESTED_TRANSFORMERS = ">=5.17,<6"
NAME = "attnlab"
_counter = itertools.count(1)
_registered: dict[str, Runtime] = {}
_MISSING = object()

PlanLike = HFPlan | Mapping[str, Any] | str | os.PathLike[str] | None


def _interfaces() -> tuple[Any, Any]:
    import transformers
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if not (5, 17) <= (major, minor) < (6, 0):
        raise RuntimeError(
            f"attnlab.hf needs transformers {TESTED_TRANSFORMERS} (its mask interface takes q_offset/kv_offset); "
            f"found {transformers.__version__}"
        )
    return AttentionInterface, AttentionMaskInterface


#: generate options that run assisted generation (prompt lookup, an assistant model, early exit): they crop
#: the KV cache after rejected candidate tokens
ASSISTED: tuple[str, ...] = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _arguments(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A ``generate`` call's arguments by name: positional ones bound to the model's ``generate``
    signature (else a GenerationConfig among them taken as ``generation_config``), keywords as given."""
    method = getattr(type(model), "generate", None)
    try:
        sig = inspect.signature(method)  # type: ignore[arg-type]
        bound = sig.bind_partial(model, *args, **kwargs).arguments
    except (TypeError, ValueError):
        named = dict(kwargs)
        for arg in args:
            if type(arg).__name__.endswith("GenerationConfig"):
                named.setdefault("generation_config", arg)
        return named
    named = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif sig.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def _option(model: nn.Module, named: Mapping[str, Any], name: str) -> Any:
    """A generate option: the call's keyword, else its generation_config's, else the model's (None: unset)."""
    if named.get(name) is not None:
        return named[name]
    cfg = named.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(cfg, name, None)


def _beams(model: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """The beam count a ``generate`` call asks for (keyword, its generation_config, or the model's)."""
    return int(_option(model, kwargs, "num_beams") or 1)


def _guard(
    model: nn.Module, stateful: list[str], free_kv: bool, visual: Mapping[str, int], runtime: Runtime
) -> Any:
    """The model's current ``generate`` wrapped: every call starts the decode state of the cache it is given
    over (a generation from a cached prefix makes no prefill call, which would otherwise do it), and refuses
    what the per-cache state cannot follow: beam search with a stateful decode method (it reorders the
    cache's rows between steps) and assisted generation (``prompt_lookup_num_tokens``, ``assistant_model``,
    ``assistant_early_exit``: it crops the cache after rejected candidates) with a stateful decode method
    or ``free_kv``; and images (``visual``: the model's image inputs; generate builds their mask before it
    calls the model). A ``use`` inside another wraps the outer one's guard."""
    generate: Any = model.generate
    methods = ", ".join(stateful)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        named = _arguments(model, args, kwargs)
        for name in visual:
            if named.get(name) is not None:
                raise _images_error(model, name)
        beams = _beams(model, named)
        if stateful and beams > 1:
            raise HFRuntimeError(
                f"generate(num_beams={beams}) under attnlab.hf.use with the stateful decode method(s) "
                f"{methods}: beam search reorders the KV cache's rows between steps and their "
                "per-row state (page summaries, kept sets) would not follow; use greedy or sampling "
                "(num_beams=1), or a stateless decode method (e.g. 'softmax', 'sliding_window')"
            )
        for name in ASSISTED:
            value = _option(model, named, name)
            if value is not None and (stateful or free_kv):
                shown = type(value).__name__ if name == "assistant_model" else repr(value)
                what = f"the stateful decode method(s) {methods}" if stateful else "free_kv=True"
                raise HFRuntimeError(
                    f"generate({name}={shown}) under attnlab.hf.use with {what}: assisted generation (prompt "
                    "lookup, an assistant model, early exit) crops the KV cache after rejected candidate tokens, "
                    "which the per-cache decode state (page summaries, kept sets, evicted tokens) would not "
                    "follow; generate without it, or use a stateless decode method (e.g. 'softmax', "
                    "'sliding_window') without free_kv"
                )
        cache = model_cache(named)
        if cache is not None:
            runtime.reset(cache)
        return generate(*args, **kwargs)

    return guarded


#: keywords of a model's forward that carry images or videos
_VISUAL = ("pixel_values", "pixel_values_videos")


def _visual_inputs(model: nn.Module) -> dict[str, int]:
    """The image (or video) inputs a model's forward takes (e.g. Gemma 3's multimodal model), each with
    its position among the forward's parameters."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}
    return {name: params.index(name) for name in _VISUAL if name in params}


def _images_error(model: nn.Module, name: str) -> HFRuntimeError:
    return HFRuntimeError(
        f"{type(model).__name__} got {name} under attnlab.hf.use: attnlab.hf runs the language model's "
        "attention on causal methods, while image tokens attend to each other both ways (a mask attnlab's "
        "methods do not apply); run prompts with images outside attnlab.hf.use, or pass text only"
    )


def _images_hook(model: nn.Module, visual: Mapping[str, int]) -> Any:
    """A forward pre-hook (with kwargs) of the model that refuses a call with images before anything runs
    (the image tokens attend to each other both ways); text runs."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for name, i in visual.items():
            if kwargs.get(name) is not None or (i < len(args) and args[i] is not None):
                raise _images_error(model, name)

    return hook


def _configs(model: nn.Module) -> list[Any]:
    """The distinct configs of the model's attention modules (a vision tower's, whose attention attnlab.hf
    does not run, keeps its implementation)."""
    seen: dict[int, Any] = {}
    for m in attention_modules(model):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _compact_hook(runtime: Runtime) -> Any:
    """A forward hook (with kwargs) for attention modules: after a layer's attention ran, compact its cache
    layer if its eviction state was just decided (see :mod:`attnlab.hf.kv`)."""

    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        layer = int(getattr(module, "layer_idx", 0) or 0)
        entries = runtime._pending.pop(layer, None)
        if entries is None:
            return
        cache = model_cache(kwargs)
        if cache is None or not hasattr(cache, "layers"):
            raise HFRuntimeError(
                f"layer {layer}: free_kv needs the model's cache (cache / past_key_values) passed to its attention "
                f"module; got {type(cache).__name__}"
            )
        kind, rows = entries
        if kind is True:
            compact(runtime, layer, cache.layers[layer], rows)
        elif isinstance(kind, tuple) and max(e - s for _, s, e in rows) > sum(kind) + SLACK:
            compact_window(runtime, layer, cache.layers[layer], kind, rows)

    return hook


@contextlib.contextmanager
def use(
    model: nn.Module,
    prefill: Any = None,
    decode: Any = None,
    *,
    prefill_params: Mapping[str, Any] | None = None,
    decode_params: Mapping[str, Any] | None = None,
    plan: PlanLike = None,
    free_kv: bool = False,
) -> Iterator[Runtime]:
    """Run ``model``'s attention on attnlab methods inside the ``with`` block::

        with attnlab.hf.use(model, prefill="vertical_slash", decode="softmax"):
            out = model.generate(**inputs, max_new_tokens=64)

    Args:
        model: a transformers causal LM whose attention classes are in
            :data:`attnlab.hf.models.SUPPORTED_ATTENTION` (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3).
        prefill: the method of prefill calls (no cached keys before the queries): a name or
            ``{"method": name, "params": {...}}``; default ``softmax`` (or the plan's).
        decode: the method of decode calls (queries after cached keys); default ``softmax``.
        prefill_params, decode_params: parameters of those methods.
        plan: per-layer and per-head methods (a dict, a .json/.yaml path or an HFPlan; schema in
            :mod:`attnlab.hf.plan`); the arguments above replace its defaults.
        free_kv: remove the tokens the eviction methods (``snapkv``, ``h2o``) drop from transformers'
            DynamicCache once they decide (their first decode step), and the middle that the sink + window
            methods (``retrieval_heads_kv`` without retrieval heads, ``streaming``) no longer read, so the
            cache memory shrinks to the budget; default False (they only mask). Same tokens as the masking path; details, padding
            and the logical cache length in :mod:`attnlab.hf.kv`. Layers running other methods are left
            as they are. Report the memory with :func:`attnlab.hf.kv_memory`.

    The plan is checked against the model before anything runs (unknown methods or parameters, layers or
    heads the model lacks, a prefill-only method for decode or the reverse, a method that cannot keep the
    model's soft cap). With a stateful decode method, ``model.generate`` refuses beam search inside the
    block (the state follows one sequence per batch row), and with one or ``free_kv`` it refuses assisted
    generation (``prompt_lookup_num_tokens``, ``assistant_model``, ``assistant_early_exit``: it crops the
    cache); each ``generate`` starts the decode state of the cache it is given over. The decode state is
    kept per KV cache (:class:`~attnlab.hf.interface.Runtime`). Inputs with images (``pixel_values``, e.g.
    Gemma 3's multimodal model) are refused: only the language model's attention runs on attnlab. A
    StaticCache (``cache_implementation="static"``) works: its empty slots are never attended. Yields the
    :class:`~attnlab.hf.interface.Runtime` (its ``calls`` count what ran, its ``states`` hold stateful
    methods' per-layer state of the last call's cache). On exit, also when the block raises, the model's
    ``_attn_implementation``, its ``generate`` and transformers' registries are restored.
    """
    attention_iface, mask_iface = _interfaces()
    info = inspect_model(model)
    hplan = load_plan(plan, prefill=prefill, decode=decode, prefill_params=prefill_params,
                      decode_params=decode_params)  # fmt: skip
    stateful = check_plan(hplan, info)
    runtime = Runtime(hplan, info)
    key = f"attnlab_use_{next(_counter)}"
    configs = _configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    if not isinstance(free_kv, bool):
        raise TypeError(f"free_kv must be True or False, got {free_kv!r}")
    runtime.free_kv = free_kv
    visual = _visual_inputs(model)
    guard = bool(stateful or free_kv or visual) and hasattr(model, "generate")
    previous = vars(model).get("generate", _MISSING)  # (an outer use's guard, restored below)
    hooks = []
    attention_iface._global_mapping[key] = runtime.forward
    mask_iface._global_mapping[key] = mask_function
    try:
        modules = attention_modules(model)
        for m in modules:
            runtime.watch(m)
        if free_kv:
            hooks = [m.register_forward_hook(_compact_hook(runtime), with_kwargs=True) for m in modules]
        if visual:
            hooks.append(model.register_forward_pre_hook(_images_hook(model, visual), with_kwargs=True))
        for cfg in configs:
            cfg._attn_implementation_internal = key
        if guard:  # an instance attribute, restored below
            model.generate = _guard(model, stateful, free_kv, visual, runtime)
        yield runtime
    finally:
        runtime.unwatch()
        for hook in hooks:
            hook.remove()
        for cfg, old in saved:
            cfg._attn_implementation_internal = old
        if guard:
            if previous is _MISSING:
                vars(model).pop("generate", None)
            else:
                model.generate = previous
        attention_iface._global_mapping.pop(key, None)
        mask_iface._global_mapping.pop(key, None)


def register(
    plan: PlanLike = None,
    *,
    prefill: Any = None,
    decode: Any = None,
    prefill_params: Mapping[str, Any] | None = None,
    decode_params: Mapping[str, Any] | None = None,
    name: str = NAME,
) -> Runtime:
    """Register ``name`` (default ``"attnlab"``) with transformers' AttentionInterface and
    AttentionMaskInterface, so that ``from_pretrained(..., attn_implementation="attnlab")`` or
    ``model.set_attn_implementation("attnlab")`` runs the given methods (default: ``softmax`` for both
    phases). An explicit call: nothing registers at import. The plan's methods are checked now, and
    against each model on its first attention call (:func:`check_plan`, the model read from that attention
    module's config). Registering a name again replaces its plan. Returns the Runtime; :func:`unregister`
    removes the entries. The decode state is kept per KV cache (a cache that shrank, or a new prefill,
    starts its state over), so models and caches never share it. Unlike :func:`use`, nothing here refuses
    beam search or assisted generation (there is no model to guard): with a stateful decode method,
    generate with ``num_beams=1`` and no ``prompt_lookup_num_tokens`` / ``assistant_model`` only (beam
    search reorders the cache's rows, which the per-row state would miss; assisted generation crops the
    cache)."""
    attention_iface, mask_iface = _interfaces()
    if name in attention_iface._global_mapping and name not in _registered:
        raise PlanError(
            f"transformers already has an attention implementation named {name!r}; pick another name"
        )
    hplan = load_plan(plan, prefill=prefill, decode=decode, prefill_params=prefill_params,
                      decode_params=decode_params)  # fmt: skip
    runtime = Runtime(hplan, None)
    replaced = _registered.get(name)
    if replaced is not None:
        replaced.unwatch()
    _registered[name] = runtime
    attention_iface.register(name, runtime.forward)
    mask_iface.register(name, mask_function)
    return runtime


def unregister(name: str = NAME) -> None:
    """Remove what :func:`register` added (models still pointing at ``name`` then fail to run)."""
    attention_iface, mask_iface = _interfaces()
    runtime = _registered.pop(name, None)
    if runtime is not None:
        runtime.unwatch()
        attention_iface._global_mapping.pop(name, None)
        mask_iface._global_mapping.pop(name, None)
