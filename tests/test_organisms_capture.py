"""Q/K/V captured from a Llama model reproduce its attention through attnlab (post-RoPE, GQA kept)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.organisms.capture import capture_qkv
from attnlab.organisms.config import ModelConfig
from attnlab.organisms.errors import ConfigError


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=96)
    return LlamaForCausalLM(cfg.llama_config()).eval()


def test_captured_qkv_reproduce_the_attention_output(model) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 300, (2, 37))
    layers = capture_qkv(model, ids)
    assert [c.layer for c in layers] == [0, 1]
    for c in layers:
        assert c.q.shape == (2, 4, 37, 16) and c.k.shape == c.v.shape == (2, 2, 37, 16)
        assert c.scale == pytest.approx(16**-0.5)
        o = attnlab.attention(c.q, c.k, c.v, method="softmax", causal=True, scale=c.scale)
        attn = model.model.layers[c.layer].self_attn
        with torch.no_grad():
            out = attn.o_proj(o.transpose(1, 2).reshape(2, 37, 64))
        torch.testing.assert_close(out, c.out, atol=1e-5, rtol=1e-4)


def test_rope_is_applied(model) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 300, (1, 9))
    (c,) = capture_qkv(model, ids, layers=[0])
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k_raw = model.model.layers[0].self_attn.k_proj(hidden).view(1, 9, 2, 16).transpose(1, 2)
    torch.testing.assert_close(c.k[:, :, 0], k_raw[:, :, 0])  # position 0: the rotation is the identity
    assert not torch.allclose(c.k[:, :, 1:], k_raw[:, :, 1:])  # later positions are rotated


def test_capture_errors(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"layers \[5\] out of range: the model has 2 layers"):
        capture_qkv(model, torch.zeros(1, 4, dtype=torch.long), layers=[5])
    with pytest.raises(ConfigError, match=r"shape \(4,\): expected \(batch, tokens\)"):
        capture_qkv(model, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="expected a Llama-style causal LM"):
        capture_qkv(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))  # type: ignore[arg-type]
