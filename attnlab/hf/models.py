"""The transformers attention classes attnlab runs, what it reads from a model, and small test models.

:func:`inspect_model` finds every attention layer of a model, refuses classes it does not support (the
message names the class and the supported ones) and reads, per layer, the facts that decide how a method
runs there: the model's sliding window, its logit soft cap and its heads. :func:`tiny_config` builds a
config with a real model's head dim and GQA ratio but tiny depth and width, for tests and benchmarks
(nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from attnlab.errors import AttnlabError

#: Attention classes that call transformers' AttentionInterface with (module, q, k, v, mask, scaling=,
#: dropout=, sliding_window=, softcap=) in the (B, H, N, D) layout; tested in tests/test_hf_*.py.
SUPPORTED_ATTENTION: tuple[str, ...] = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "Gemma2Attention",
    "Gemma3Attention",
    "Phi3Attention",
)


#: Attention classes that keep a config's ``attn_logit_softcapping`` as an attribute but never pass it to the
#: attention function (Gemma 3 replaced the cap by QK-norm; transformers 5.17-5.23): they run uncapped.
NO_SOFTCAP_PASSED: frozenset[str] = frozenset({"Gemma3Attention"})


class UnsupportedModelError(AttnlabError, TypeError):
    """The model has an attention class attnlab.hf does not run."""


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer: its index, class, the model's sliding window (None: full causal) and logit soft
    cap (None: none)."""

    index: int
    cls: str
    sliding_window: int | None
    softcap: float | None


@dataclass(frozen=True)
class ModelInfo:
    """What attnlab reads from a model: its attention layers and head counts."""

    layers: tuple[LayerInfo, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerInfo | None:
        for info in self.layers:
            if info.index == index:
                return info
        return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers: modules whose class name ends in ``Attention`` and that have a
    ``layer_idx`` (transformers' convention), in module order."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def inspect_model(model: nn.Module) -> ModelInfo:
    """The model's attention layers, checked: every one must be of a supported class."""
    mods = attention_modules(model)
    if not mods:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention layer attnlab.hf recognises (a module named *Attention "
            f"with a layer_idx); supported attention classes: {', '.join(SUPPORTED_ATTENTION)}"
        )
    bad = sorted({type(m).__name__ for m in mods} - set(SUPPORTED_ATTENTION))
    if bad:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses the attention class {bad[0]}, which attnlab.hf does not support; "
            f"supported attention classes: {', '.join(SUPPORTED_ATTENTION)}"
        )
    layers = [_layer_info(m, int(getattr(m, "layer_idx"))) for m in mods]  # noqa: B009
    return _model_info(mods[0].config, layers)


def _layer_info(module: nn.Module, index: int) -> LayerInfo:
    """What an attention module's forward passes to the attention function: its sliding window (the
    module's own, else its config's) and soft cap (none for :data:`NO_SOFTCAP_PASSED`)."""
    cfg: Any = getattr(module, "config", None)
    window = getattr(module, "sliding_window", getattr(cfg, "sliding_window", None))
    cap = getattr(module, "attn_logit_softcapping", None)
    if type(module).__name__ in NO_SOFTCAP_PASSED:
        cap = None
    return LayerInfo(index, type(module).__name__, window, cap)


def _model_info(cfg: Any, layers: list[LayerInfo]) -> ModelInfo:
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return ModelInfo(tuple(sorted(layers, key=lambda x: x.index)), heads, kv, head_dim)


def info_from_module(module: nn.Module) -> ModelInfo | None:
    """The :func:`inspect_model` of the model one attention module belongs to, from that module and its
    config (``register()`` meets a model's attention modules one call at a time, never the model): every
    layer of ``num_hidden_layers`` of the module's class, the sliding window as the supported classes set it
    (a class whose modules carry ``sliding_window`` takes the config's window on the ``layer_types``
    entries ``"sliding_attention"``, another class the config's ``sliding_window`` on every layer) and the
    module's soft cap. None when the config lacks the layer or head counts."""
    cfg: Any = getattr(module, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or not isinstance(getattr(cfg, "num_attention_heads", None), int):
        return None
    own = _layer_info(module, int(getattr(module, "layer_idx", 0) or 0))
    types = getattr(cfg, "layer_types", None)
    layers = []
    for i in range(n):
        if i == own.index:
            layers.append(own)
            continue
        window = getattr(cfg, "sliding_window", None)
        if hasattr(module, "sliding_window"):
            sliding = types is not None and i < len(types) and types[i] == "sliding_attention"
            window = window if sliding else None
        layers.append(LayerInfo(i, own.cls, window, own.softcap))
    return _model_info(cfg, layers)


#: real models' attention shapes (query heads, kv heads, head dim) and their config class names
_SHAPES: dict[str, tuple[str, int, int, int]] = {
    "llama3": ("LlamaConfig", 32, 8, 128),  # Llama-3-8B
    "qwen2": ("Qwen2Config", 28, 4, 128),  # Qwen2-7B
    "qwen3": ("Qwen3Config", 32, 8, 128),  # Qwen3-8B
    "mistral": ("MistralConfig", 32, 8, 128),  # Mistral-7B (sliding window 4096 in v0.1)
    "gemma2": ("Gemma2Config", 16, 8, 256),  # Gemma-2-9B
    "gemma3": ("Gemma3TextConfig", 16, 8, 256),  # Gemma-3-12B
    "phi3": ("Phi3Config", 32, 32, 96),  # Phi-3-mini
}
ARCHITECTURES: tuple[str, ...] = tuple(_SHAPES)


def tiny_config(
    arch: str,
    *,
    layers: int = 2,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 128,
    full: bool = False,
    **overrides: Any,
) -> Any:
    """A transformers config for ``arch`` (one of :data:`ARCHITECTURES`) with the real model's head dim
    and GQA ratio, but ``layers`` layers, 2 KV heads (``full=True``: the real head counts) and a narrow
    residual stream (128; Phi-3: heads x head dim) and MLP. ``overrides`` go to the config (e.g. ``sliding_window=8``)."""
    import transformers

    if arch not in _SHAPES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(_SHAPES)}")
    cls_name, h, hk, d = _SHAPES[arch]
    ratio = h // hk
    kv_heads = kv_heads if kv_heads is not None else (hk if full else 2)
    heads = heads if heads is not None else kv_heads * ratio
    kwargs: dict[str, Any] = dict(
        hidden_size=heads * d if arch == "phi3" else 128,  # Phi-3 derives its head dim from the width
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=None if arch == "phi3" else d,
        intermediate_size=64,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch in ("gemma2", "gemma3"):
        # Gemma scales by query_pre_attn_scalar ** -0.5 (not D ** -0.5); sliding and full layers alternate
        kwargs["query_pre_attn_scalar"] = d // 2
        kwargs["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + [
            "sliding_attention"
        ] * (layers % 2)
        kwargs["sliding_window"] = 4096
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**{k: v for k, v in kwargs.items() if v is not None})
