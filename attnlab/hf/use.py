"""``attnlab.hf.use(model, ...)``: run a transformers causal LM on attnlab methods for a ``with`` block;
``attnlab.hf.register()``: make ``attn_implementation="attnlab"`` available to transformers.

Nothing is registered or patched at import. ``use`` registers an attention function and its mask function
under a fresh name, points the model's configs at it, and in ``finally`` (also when the block raises)
removes both entries and restores every config's ``_attn_implementation``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from attnlab.hf.interface import HFRuntimeError, Runtime, effective, mask_function
from attnlab.hf.kv import SLACK, compact, compact_window
from attnlab.hf.models import ModelInfo, attention_modules, inspect_model
from attnlab.hf.plan import PHASES, HFPlan, PlanError, check_method, load_plan

#: transformers releases this integration is tested with (the GPU machine has 5.17; CI 5.23)
TESTED_TRANSFORMERS = ">=5.17,<6"
NAME = "attnlab"
_counter = itertools.count(1)
_registered: dict[str, Runtime] = {}

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


def check_plan(plan: HFPlan, info: ModelInfo) -> list[str]:
    """Check ``plan`` against the model: layers and heads it has, and for every layer, head and phase the
    method that will run there (after the model's sliding window and soft cap are applied). Raises
    :class:`~attnlab.hf.plan.PlanError` before anything runs. Returns the stateful methods the plan runs."""
    top = max(layer.index for layer in info.layers) + 1
    plan.check(top, info.num_heads)
    stateful: set[str] = set()
    tidal_roles: set[str] = set()
    for layer in info.layers:
        for head in range(info.num_heads):
            for phase in PHASES:
                ref, explicit = plan.method(layer.index, head, phase)
                where = f"layer {layer.index} ({layer.cls}), head {head}, {phase}"
                eff = effective(ref, explicit, layer.sliding_window, layer.softcap, plan, where)
                check_method(eff, phase, where)
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


def _beams(model: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """The beam count a ``generate`` call asks for (keyword, its generation_config, or the model's)."""
    if kwargs.get("num_beams") is not None:
        return int(kwargs["num_beams"])
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return int(getattr(cfg, "num_beams", 1) or 1)


def _refuse_beams(model: nn.Module, stateful: list[str], runtime: Runtime) -> Any:
    """A ``generate`` that starts every call with fresh decode state (a generation from a cached prefix makes
    no prefill call, which would otherwise reset it) and refuses beam search (the decode methods' state
    follows one sequence per batch row; beam search reorders the cache's rows between steps, which the
    state would silently miss)."""
    generate: Any = model.generate

    def guarded(*args: Any, **kwargs: Any) -> Any:
        runtime.reset()
        beams = _beams(model, kwargs)
        if beams > 1:
            raise HFRuntimeError(
                f"generate(num_beams={beams}) under attnlab.hf.use with the stateful decode method(s) "
                f"{', '.join(stateful)}: beam search reorders the KV cache's rows between steps and their "
                "per-row state (page summaries, kept sets) would not follow; use greedy or sampling "
                "(num_beams=1), or a stateless decode method (e.g. 'softmax', 'sliding_window')"
            )
        return generate(*args, **kwargs)

    return guarded


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of the model and its submodules (sub-configs included)."""
    seen: dict[int, Any] = {}
    stack = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen[id(cfg)] = cfg
        for name in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, name, None))
    return list(seen.values())


def model_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a transformers layer passes to its attention module: ``cache=`` from transformers 5.24
    on, ``past_key_values=`` before (None when neither is given)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


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
    block (the state follows one sequence per batch row). A StaticCache (``cache_implementation="static"``)
    works: its empty slots are never attended. Yields the :class:`~attnlab.hf.interface.Runtime` (its ``calls`` count what ran,
    its ``states`` hold stateful methods' per-layer state). On exit, also when the block raises, the
    model's ``_attn_implementation`` and transformers' registries are restored.
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
    had_generate = "generate" in vars(model)
    if not isinstance(free_kv, bool):
        raise TypeError(f"free_kv must be True or False, got {free_kv!r}")
    runtime.free_kv = free_kv
    hooks = []
    attention_iface._global_mapping[key] = runtime.forward
    mask_iface._global_mapping[key] = mask_function
    try:
        if free_kv:
            hooks = [
                m.register_forward_hook(_compact_hook(runtime), with_kwargs=True)
                for m in attention_modules(model)
            ]
        for cfg in configs:
            cfg._attn_implementation_internal = key
        if stateful and hasattr(model, "generate") and not had_generate:
            model.generate = _refuse_beams(model, stateful, runtime)  # (an instance attribute, removed below)
        yield runtime
    finally:
        for hook in hooks:
            hook.remove()
        for cfg, old in saved:
            cfg._attn_implementation_internal = old
        if stateful and not had_generate:
            vars(model).pop("generate", None)
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
    against each model's layers and heads on its first attention call. Registering a name again replaces
    its plan. Returns the Runtime; :func:`unregister` removes the entries. Unlike :func:`use`, nothing here
    refuses beam search (there is no model to guard): with a stateful decode method, generate with
    ``num_beams=1`` only (beam search reorders the cache's rows, which the per-row state would miss)."""
    attention_iface, mask_iface = _interfaces()
    if name in attention_iface._global_mapping and name not in _registered:
        raise PlanError(
            f"transformers already has an attention implementation named {name!r}; pick another name"
        )
    hplan = load_plan(plan, prefill=prefill, decode=decode, prefill_params=prefill_params,
                      decode_params=decode_params)  # fmt: skip
    runtime = Runtime(hplan, None)
    _registered[name] = runtime
    attention_iface.register(name, runtime.forward)
    mask_iface.register(name, mask_function)
    return runtime


def unregister(name: str = NAME) -> None:
    """Remove what :func:`register` added (models still pointing at ``name`` then fail to run)."""
    attention_iface, mask_iface = _interfaces()
    if _registered.pop(name, None) is not None:
        attention_iface._global_mapping.pop(name, None)
        mask_iface._global_mapping.pop(name, None)
