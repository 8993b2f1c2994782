"""Builders the Hugging Face tests share (no test module imports another): tiny config-built models, token
ids, left-padded batches, and a plan that forces non-compiling backends on a CPU."""

from __future__ import annotations

from typing import Any

import torch

import attnlab
from attnlab.hf.models import tiny_config


def cpu_backends() -> dict[str, str]:
    """Per method, a backend that runs tiny CPU tests without compiling (Flex on a CPU compiles for ~30 s
    once): sdpa_mask, else eager, else sdpa."""
    out: dict[str, str] = {}
    for name, spec in attnlab.methods().items():
        names = [b.name for b in spec.backends]
        for choice in ("sdpa_mask", "eager", "sdpa"):
            if choice in names:
                out[name] = choice
                break
    return out


def fast_plan() -> dict[str, Any]:
    """A plan fragment forcing :func:`cpu_backends`: ``use(model, plan=fast_plan())``."""
    return {"backends": cpu_backends()}


def build(arch: str, attn: str = "sdpa", seed: int = 0, **overrides: Any) -> Any:
    """A tiny model of ``arch`` (real head dims and GQA ratios) from its config, random weights, eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.eval()


def ids(batch: int = 2, n: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, n) in [3, 128)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


def padded(
    batch: int = 3, n: int = 12, pads: tuple[int, ...] = (0, 3, 7)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of a left-padded batch: sequence b has ``pads[b]`` padding tokens first."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 128, (batch, n), generator=g)
    mask = torch.ones_like(tokens)
    for b, p in enumerate(pads[:batch]):
        mask[b, :p] = 0
        tokens[b, :p] = 0
    return tokens, mask
