"""Q, K, V of every attention layer of a Llama-architecture model, as its attention sees them.

``q`` and ``k`` are taken after the rotary position embedding, ``v`` as projected; the layout is attnlab's
``(B, H, N, D)`` with ``k``/``v`` at the model's key/value head count (GQA, not repeated). A causal LM's
attention is then ``attnlab.attention(q, k, v, method="softmax", causal=True, scale=scale)`` (aligned
bottom-right), followed by the layer's ``o_proj``: the tests check that this reproduces the model's own
attention output. Captured with forward hooks that recompute the projections from the layer's input
(nothing in transformers is patched; the hooks are removed when the call returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnlab.organisms.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclass(frozen=True)
class CapturedLayer:
    """One layer's attention inputs: ``q`` (B, H, N, D), ``k`` and ``v`` (B, H_kv, N, D), float32 on
    the CPU; ``scale`` is the model's softmax scale (1/sqrt(D) for Llama); ``out`` (B, N, hidden) is the
    layer's attention output after ``o_proj``, as the model computed it."""

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    out: Tensor


@torch.no_grad()
def capture_qkv(
    model: PreTrainedModel, input_ids: Tensor, layers: list[int] | None = None
) -> list[CapturedLayer]:
    """Run ``model`` on ``input_ids`` (B, N) and return the Q/K/V of ``layers`` (default: all), in order."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None or not all(hasattr(b, "self_attn") for b in blocks):
        raise ConfigError(
            f"capture_qkv: expected a Llama-style causal LM (model.model.layers[i].self_attn), got "
            f"{type(model).__name__}"
        )
    if input_ids.ndim != 2:
        raise ConfigError(
            f"capture_qkv: input_ids of shape {tuple(input_ids.shape)}: expected (batch, tokens)"
        )
    wanted = list(range(len(blocks))) if layers is None else list(layers)
    bad = [i for i in wanted if not 0 <= i < len(blocks)]
    if bad:
        raise ConfigError(f"capture_qkv: layers {bad} out of range: the model has {len(blocks)} layers")
    seen: dict[int, dict[str, Any]] = {}
    handles = []

    def pre_hook(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            v = module.v_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            seen[index] = {"q": q, "k": k, "v": v, "scale": float(module.scaling)}

        return hook

    def post_hook(index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            seen[index]["out"] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for i in wanted:
            attn = blocks[i].self_attn
            handles.append(attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(attn.register_forward_hook(post_hook(i), with_kwargs=True))
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    f = lambda t: t.detach().float().cpu().contiguous()
    return [
        CapturedLayer(
            i, f(seen[i]["q"]), f(seen[i]["k"]), f(seen[i]["v"]), seen[i]["scale"], f(seen[i]["out"])
        )
        for i in wanted
    ]


def capture_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, tokens: int
) -> list[CapturedLayer]:
    """:func:`capture_qkv` on the first ``tokens`` tokens of ``text`` (one sequence); the text must be
    long enough."""
    from attnlab.organisms.tokenizer import encode

    ids = encode(tokenizer, text)
    if len(ids) < tokens:
        raise ConfigError(f"capture_text: the text has {len(ids)} tokens; {tokens} were asked for")
    return capture_qkv(model, torch.tensor([ids[:tokens]]))
