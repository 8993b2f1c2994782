"""Which attnlab method each layer and head of a transformers model runs, in prefill and in decode.

A plan is a dict (or a ``.json`` / ``.yaml`` file holding one)::

    {
      "prefill": "vertical_slash",                          # the default of every layer and head
      "decode": {"method": "softmax"},                      # (default: "softmax" for both phases)
      "prefill_params": {"vertical": 500},                  # parameters of the default prefill method
      "decode_params": {},                                  # parameters of the default decode method
      "layers": {                                           # per layer (0-based; "2-5" is a range)
        0: "softmax",                                       # a bare method: both phases where it can run
        "1-3": {"prefill": {"method": "streaming", "params": {"sinks": 4, "window": 256}}},
      },
      "heads": {                                            # per query head of a layer (GQA-aware)
        3: {5: "softmax", "0-1": {"decode": "softmax"}},
      },
      "sliding": "keep",                                    # or "override" (see below)
      "softcap": "require",                                 # or "drop" (see below)
      "backends": {"sliding_window": "block_sparse"},       # force a backend per method (default: auto)
    }

A *method* is a name or ``{"method": name, "params": {...}}``. An *assignment* is a method (a bare
method applies to every phase it can run: a decode-family method to decode, a dynamic (prefill) method to
prefill, a dense or static method to both) or ``{"prefill": method, "decode": method}`` with either key
optional. The most specific entry wins, per phase: ``heads`` over ``layers`` over the defaults.

Phases: a call whose queries have no cached keys before them (``N_q == N_k``) is *prefill*; a call whose
queries come after cached keys (``N_q < N_k``: decode, or a chunk of prefill after a cached prefix) is
*decode*. Prefill takes the families ``dense``, ``static``, ``dynamic``; decode takes ``dense``,
``static``, ``decode``. Methods with required tensor inputs and the ``linear`` family (a recurrent state
in place of the KV cache) cannot run inside a transformers model.

Layers with a model sliding window (Mistral, Gemma 2/3 sliding layers, Qwen2 with ``use_sliding_window``):
with ``"sliding": "keep"`` (default) such a layer keeps the model's window: methods that come from the
plan's defaults are replaced there by ``sliding_window(window=W)``, the model's own exact attention, and
a ``softmax`` named for that layer or head means the same; another method named for that layer or head
runs as named, in place of the window (the plan overrides it). With ``"sliding": "override"`` every
method runs as the plan says (``softmax`` is then full causal attention) in place of the window. A method
run in place of a window needs a cache that keeps every token: transformers' default cache keeps only the
window on such layers, and decode there is refused; pass ``past_key_values=transformers.DynamicCache()``.

Logit soft-capping (Gemma 2's ``attn_logit_softcapping``): ``softmax`` runs as the ``softcap`` method
with the model's cap, and a sliding window on such a layer (the model's, kept, or a ``sliding_window`` the
plan names) as ``softcap`` with that ``window`` (Gemma 2/3's sliding layers keep both); a method that
cannot soft-cap is refused there unless ``"softcap": "drop"`` (the cap is then left out, and the layer
computes a different function).

Budgets larger than the context fall back to exact attention: a static or dynamic method whose window or
budget covers every key computes exact causal attention (its mask keeps every key); a decode method
whose ``budget`` (tokens) is at least the number of cached keys runs exact attention for that step (the
decode family's rule, :mod:`attnlab.catalog.decode._common`; its state is still brought up to date).

Stateful decode methods keep one state per KV cache and layer (per head group and per padded-batch group
of sequences), cleared when a new prefill starts on that cache or the cache shrank (cropped); ``tidal``
passes its selected positions from layer to layer (set each layer's ``role`` in ``layers``: e.g.
``{"0-1": {"decode": {"method": "tidal", "params": {"role": "full"}}}, 2: ...}``).

Parameters are plain values; lists (all a JSON or YAML plan can write) are taken as tuples. The ``heads``
of ``retrieval_heads_kv`` are the model's KV heads (query head ``h`` uses KV head ``h // group``), also in
``heads`` entries: there they must be KV heads of the query heads that run the method (e.g. query heads
4-7 of a model with group 2 use KV heads 2 and 3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attnlab.core import MethodSpec
from attnlab.errors import AttnlabError, ParamError, did_you_mean
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.registry import get, methods

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")
#: the families each phase runs
PHASE_FAMILIES: dict[str, tuple[str, ...]] = {
    "prefill": ("dense", "static", "dynamic"),
    "decode": ("dense", "static", "decode"),
}
_PHASE_PATTERN = {"prefill": Pattern.CAUSAL_SELF, "decode": Pattern.CAUSAL_CROSS}
_TOP_KEYS = ("default", "prefill", "decode", "prefill_params", "decode_params", "layers", "heads", "sliding",
             "softcap", "backends")  # fmt: skip


class PlanError(AttnlabError, ValueError):
    """A plan names a method, layer, head or option that the model or attnlab does not have."""


@dataclass(frozen=True)
class MethodRef:
    """One method with its parameters (validated against the method's Params when the plan is checked)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def spec(self) -> MethodSpec:
        return get(self.name)

    def make_params(self) -> Params:
        return self.spec().make_params(self.kwargs)

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}({inner})" if inner else self.name


SOFTMAX = MethodRef("softmax")


@dataclass(frozen=True)
class Assignment:
    """The methods of one layer or head: per phase, or None where a less specific entry decides."""

    prefill: MethodRef | None = None
    decode: MethodRef | None = None

    def get(self, phase: str) -> MethodRef | None:
        return self.prefill if phase == "prefill" else self.decode


@dataclass(frozen=True)
class HFPlan:
    """A validated-shape plan (see the module docstring for the schema). Build with :func:`load_plan`."""

    prefill: MethodRef = SOFTMAX
    decode: MethodRef = SOFTMAX
    layers: Mapping[int, Assignment] = field(default_factory=dict)
    heads: Mapping[int, Mapping[int, Assignment]] = field(default_factory=dict)
    sliding: Literal["keep", "override"] = "keep"
    softcap: Literal["require", "drop"] = "require"
    #: method name -> the backend its calls are forced to (``attnlab.prepare(..., backend=)``)
    backends: Mapping[str, str] = field(default_factory=dict)

    def method(self, layer: int, head: int, phase: str) -> tuple[MethodRef, bool]:
        """(the method of ``head`` of ``layer`` in ``phase``, whether the plan names it for that layer or
        head rather than by its defaults)."""
        entry = self.heads.get(layer, {}).get(head)
        if entry is not None and entry.get(phase) is not None:
            return entry.get(phase), True  # type: ignore[return-value]
        entry = self.layers.get(layer)
        if entry is not None and entry.get(phase) is not None:
            return entry.get(phase), True  # type: ignore[return-value]
        return (self.prefill if phase == "prefill" else self.decode), False

    def refs(self) -> Iterable[tuple[str, str, MethodRef]]:
        """Every (where, phase, method) the plan names, for validation messages."""
        yield "default", "prefill", self.prefill
        yield "default", "decode", self.decode
        for layer, a in self.layers.items():
            for phase in PHASES:
                if (r := a.get(phase)) is not None:
                    yield f"layers[{layer}]", phase, r
        for layer, heads in self.heads.items():
            for head, a in heads.items():
                for phase in PHASES:
                    if (r := a.get(phase)) is not None:
                        yield f"heads[{layer}][{head}]", phase, r

    def check(self, num_layers: int | None = None, num_heads: int | None = None) -> None:
        """Every method exists, takes its parameters and can run in its phase; every layer and head is one
        the model has (when given). Raises :class:`PlanError` naming the entry."""
        for where, phase, ref in self.refs():
            check_method(ref, phase, where)
        for name, backend in self.backends.items():
            if name not in methods():
                raise PlanError(
                    f"plan backends: unknown attention method {name!r}.{did_you_mean(name, methods())}"
                )
            if backend != "reference":
                try:
                    get(name).backend(backend)
                except ParamError as e:
                    raise PlanError(f"plan backends: {e}") from None
        if num_layers is not None:
            for where, layers in (("layers", self.layers), ("heads", self.heads)):
                bad = sorted(i for i in layers if not 0 <= i < num_layers)
                if bad:
                    raise PlanError(
                        f"plan {where} names layer {bad[0]}, but the model has {num_layers} attention layers "
                        f"(0..{num_layers - 1})"
                    )
        if num_heads is not None:
            for layer, heads in self.heads.items():
                bad = sorted(h for h in heads if not 0 <= h < num_heads)
                if bad:
                    raise PlanError(
                        f"plan heads[{layer}] names query head {bad[0]}, but the model has {num_heads} query "
                        f"heads per layer (0..{num_heads - 1})"
                    )


def phases_of(spec: MethodSpec) -> tuple[Phase, ...]:
    """The phases a method can run in a causal LM (see the module docstring)."""
    return tuple(p for p in PHASES if spec.family in PHASE_FAMILIES[p] and _PHASE_PATTERN[p] in spec.patterns)


def check_method(ref: MethodRef, phase: str, where: str = "plan") -> Params:
    """The method's validated parameters, after checking that it can run in ``phase``."""
    if ref.name not in methods():
        raise PlanError(
            f"{where}: unknown attention method {ref.name!r} for {phase}.{did_you_mean(ref.name, methods())} "
            f"Registered methods: {', '.join(methods())}"
        )
    spec = ref.spec()
    if spec.family == "linear":
        raise PlanError(
            f"{where}: method {ref.name!r} is a linear (recurrent) method: it keeps a recurrent state in place "
            "of the KV cache, which a transformers model does not carry; attnlab.hf runs softmax-family "
            "(dense, static, dynamic, decode) methods"
        )
    if phase not in phases_of(spec):
        if spec.family == "decode":
            why = "a decode-only method (it selects cached keys for a few new queries)"
        elif spec.family == "dynamic":
            why = "a prefill-only method (its estimator plans blocks of a prefill's queries)"
        else:
            why = f"a {spec.family} method without the {_PHASE_PATTERN[phase].value} pattern"
        fits = [n for n, s in methods().items() if phase in phases_of(s) and not _needs_inputs(s)]
        raise PlanError(
            f"{where}: method {ref.name!r} cannot run in {phase}: it is {why}. Methods for {phase}: "
            f"{', '.join(fits)}"
        )
    if _needs_inputs(spec):
        names = ", ".join(t.name for t in spec.inputs if t.required)
        raise PlanError(
            f"{where}: method {ref.name!r} needs tensor inputs ({names}) that a transformers model does not "
            "provide"
        )
    try:
        return ref.make_params()
    except ParamError as e:
        raise PlanError(f"{where} ({phase}): {e}") from None


def _needs_inputs(spec: MethodSpec) -> bool:
    return any(t.required for t in spec.inputs)


# -- parsing ---------------------------------------------------------------------------------------------


def _frozen(value: Any) -> Any:
    """A parameter value with its lists as tuples (recursively): JSON and YAML plans can only write lists,
    and a method's parameters must be hashable (a method names a head group and its prepared op)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _params(*given: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    merged: dict[str, Any] = {}
    for g in given:
        merged.update(g)
    return tuple((k, _frozen(v)) for k, v in merged.items())


def _ref(value: Any, where: str, params: Mapping[str, Any] | None = None) -> MethodRef:
    if isinstance(value, MethodRef):
        return MethodRef(value.name, _params(value.kwargs, params or {}))
    if isinstance(value, str):
        return MethodRef(value, _params(params or {}))
    if isinstance(value, Mapping):
        unknown = set(value) - {"method", "params"}
        if unknown or "method" not in value:
            raise PlanError(
                f"{where}: a method is a name or {{'method': name, 'params': {{...}}}}; got {dict(value)!r}"
            )
        own = value.get("params") or {}
        if not isinstance(own, Mapping) or not all(isinstance(k, str) for k in own):
            raise PlanError(f"{where}: 'params' must map parameter names to values, got {own!r}")
        if not isinstance(value["method"], str):
            raise PlanError(f"{where}: 'method' must be a method name, got {value['method']!r}")
        return MethodRef(value["method"], _params(own, params or {}))
    raise PlanError(f"{where}: a method is a name or {{'method': name, 'params': {{...}}}}; got {value!r}")


def _assignment(value: Any, where: str) -> Assignment:
    if isinstance(value, Assignment):
        return value
    if isinstance(value, Mapping) and set(value) <= {"prefill", "decode"} and value:
        return Assignment(
            prefill=_ref(value["prefill"], f"{where}.prefill") if value.get("prefill") is not None else None,
            decode=_ref(value["decode"], f"{where}.decode") if value.get("decode") is not None else None,
        )
    ref = _ref(value, where)
    if ref.name not in methods():  # check_method gives the did-you-mean message later; keep both phases
        return Assignment(prefill=ref, decode=ref)
    phases = phases_of(ref.spec())
    if not phases:
        check_method(ref, "prefill", where)  # raises with the reason
    return Assignment(
        prefill=ref if "prefill" in phases else None, decode=ref if "decode" in phases else None
    )


def _indices(key: Any, where: str) -> list[int]:
    """An int, a digit string or an inclusive range "a-b"."""
    if isinstance(key, bool):
        raise PlanError(f"{where}: index {key!r} is not an integer")
    if isinstance(key, int):
        return [key]
    if isinstance(key, str):
        lo, sep, hi = key.strip().partition("-")
        try:
            if not sep:
                return [int(lo)]
            if lo and hi and int(hi) >= int(lo):
                return list(range(int(lo), int(hi) + 1))
        except ValueError:
            pass
    raise PlanError(f"{where}: index {key!r} is not an integer or an inclusive range like '2-5'")


def load_plan(
    plan: HFPlan | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    prefill: Any = None,
    decode: Any = None,
    prefill_params: Mapping[str, Any] | None = None,
    decode_params: Mapping[str, Any] | None = None,
) -> HFPlan:
    """An :class:`HFPlan` from a dict, a ``.json`` / ``.yaml`` path or an HFPlan, with the keyword
    arguments of :func:`attnlab.hf.use` on top (they replace the plan's defaults; a ``prefill`` / ``decode``
    method given here drops the plan's ``prefill_params`` / ``decode_params``). Checks the schema and
    every method name and parameter; the model's layers and heads are checked by ``use``."""
    if isinstance(plan, HFPlan):
        data: dict[str, Any] = {"prefill": plan.prefill, "decode": plan.decode, "layers": dict(plan.layers),
                                "heads": {k: dict(v) for k, v in plan.heads.items()}, "sliding": plan.sliding,
                                "softcap": plan.softcap, "backends": dict(plan.backends)}  # fmt: skip
    elif plan is None:
        data = {}
    elif isinstance(plan, Mapping):
        data = dict(plan)
    elif isinstance(plan, str | os.PathLike):
        data = _read(Path(plan))
    else:
        raise PlanError(f"a plan is a dict, a .json/.yaml path or an HFPlan; got {type(plan).__name__}")
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        name = sorted(unknown, key=str)[0]
        raise PlanError(
            f"plan has no key {name!r}.{did_you_mean(str(name), _TOP_KEYS)} Its keys are: {', '.join(_TOP_KEYS)}"
        )
    default = (
        _assignment(data["default"], "plan default") if data.get("default") is not None else Assignment()
    )
    pre = prefill if prefill is not None else data.get("prefill")
    dec = decode if decode is not None else data.get("decode")
    pre = pre if pre is not None else (default.prefill or "softmax")
    dec = dec if dec is not None else (default.decode or "softmax")
    # a method given to use() replaces the plan's default together with the plan's parameters for it
    pre_ref = _ref(
        pre,
        "prefill",
        {**(data.get("prefill_params") or {} if prefill is None else {}), **(prefill_params or {})},
    )
    dec_ref = _ref(
        dec,
        "decode",
        {**(data.get("decode_params") or {} if decode is None else {}), **(decode_params or {})},
    )

    layers: dict[int, Assignment] = {}
    for key, value in _mapping(data.get("layers"), "plan layers").items():
        a = _assignment(value, f"layers[{key}]")
        for i in _indices(key, "plan layers"):
            layers[i] = a
    heads: dict[int, dict[int, Assignment]] = {}
    for key, per_head in _mapping(data.get("heads"), "plan heads").items():
        for i in _indices(key, "plan heads"):
            row = heads.setdefault(i, {})
            for hkey, value in _mapping(per_head, f"heads[{key}]").items():
                a = _assignment(value, f"heads[{key}][{hkey}]")
                for h in _indices(hkey, f"heads[{key}]"):
                    row[h] = a
    sliding = data.get("sliding", "keep")
    if sliding not in ("keep", "override"):
        raise PlanError(f"plan 'sliding' must be 'keep' or 'override', got {sliding!r}")
    softcap = data.get("softcap", "require")
    if softcap not in ("require", "drop"):
        raise PlanError(f"plan 'softcap' must be 'require' or 'drop', got {softcap!r}")
    backends = dict(_mapping(data.get("backends"), "plan backends"))
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in backends.items()):
        raise PlanError(f"plan backends must map method names to backend names, got {backends!r}")
    out = HFPlan(pre_ref, dec_ref, layers, heads, sliding, softcap, backends)
    out.check()
    return out


def _mapping(value: Any, where: str) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a mapping from index to assignment, got {type(value).__name__}")
    return value


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML comes with transformers
            raise PlanError("reading a .yaml plan needs PyYAML (pip install pyyaml)") from None
        data = yaml.safe_load(text)
    else:
        raise PlanError(f"plan file {str(path)!r}: expected a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise PlanError(f"plan file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data
