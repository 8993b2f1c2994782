"""Organisms with an attention plan (attnlab.organisms.architectures): a training step per architecture,
the hybrid's per-layer methods, exact cached decoding, state sizes against the real states, resume, and
clear errors for bad plans."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab
from attnlab.core import Result
from attnlab.organisms import architectures as arch
from attnlab.organisms import checkpoint as ckpt
from attnlab.organisms.config import ModelConfig, TrainConfig
from attnlab.organisms.errors import CheckpointError, ConfigError
from attnlab.organisms.train import (
    Data,
    build_model,
    build_optimizer,
    losses,
    make_batch,
    prepare_data,
    train,
)

LAYERS = 2
TINY = {
    "name": "tiny",
    "model": {
        "vocab_size": 500,
        "hidden_size": 32,
        "layers": LAYERS,
        "heads": 2,
        "kv_heads": 1,
        "intermediate_size": 64,
        "max_position": 256,
    },
    "corpus": {"max_chars": 60_000, "sources": ["pydoc"], "pydoc_share": 1.0, "heldout_share": 0.1},
    "tasks": ["passkey", "mqar"],
    "stages": [[2, 256, 2]],
    "copy_warmup": 1,
    "copy_share": 0.0,
    "eval_lengths": [256],
    "eval_samples": 1,
    "checkpoint_every": 1,
    "max_seconds": None,
}
PLANS = {
    "softmax": arch.uniform("softmax", LAYERS),
    "sliding_window": arch.uniform("sliding_window", LAYERS),
    "lightning": arch.uniform("lightning", LAYERS),
    "gated_delta": arch.uniform("gated_delta", LAYERS),
    "based": arch.uniform("based", LAYERS),
    "hybrid": arch.hybrid("gated_delta", LAYERS, [1]),
}


def tiny(
    plan: tuple[str, ...] = (), params: Mapping[str, Mapping[str, object]] | None = None, **changes: object
) -> TrainConfig:
    model = {**TINY["model"], "attention": list(plan), "attention_params": params or {}}  # type: ignore[dict-item]
    return TrainConfig.from_dict({**TINY, "model": model, **changes})


@pytest.fixture(scope="module")
def data() -> Data:
    return prepare_data(tiny())


@pytest.mark.parametrize("name", list(PLANS))
def test_one_training_step_per_architecture(name: str, data: Data) -> None:
    params = {"sliding_window": {"window": 32}} if name == "sliding_window" else {}
    cfg = tiny(PLANS[name], params)
    torch.set_num_threads(1)
    model = build_model(cfg)
    assert arch.layer_methods(model) == list(PLANS[name])
    opt = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y, answer = make_batch(cfg, data, 1)
    corpus_loss, task_loss = losses(model, x, y, answer)
    loss = torch.stack([p for p in (corpus_loss, task_loss) if p is not None]).sum()
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    # every attention weight (input makers included) gets a gradient
    for n, g in grads.items():
        if ".self_attn." in n:
            assert g is not None and float(g.abs().sum()) > 0, n
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_softmax_loss_decreases(data: Data) -> None:
    cfg = tiny(PLANS["softmax"])
    torch.set_num_threads(1)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    x, y, answer = make_batch(cfg, data, 1)
    curve = []
    for _ in range(6):
        corpus_loss, task_loss = losses(model, x, y, answer)
        loss = torch.stack([p for p in (corpus_loss, task_loss) if p is not None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss))
    assert all(math.isfinite(v) for v in curve)
    assert curve[-1] < curve[0] - 0.5, curve


def test_hybrid_plan_assigns_the_method_per_layer() -> None:
    plan = arch.hybrid("gated_delta", 4, [1, 3])
    assert plan == ("gated_delta", "softmax", "gated_delta", "softmax")
    cfg = dataclasses.replace(
        tiny(), model=dataclasses.replace(tiny().model, layers=4, attention=plan)
    ).validate()
    model = build_model(cfg)
    assert arch.layer_methods(model) == list(plan)
    for layer, method in zip(model.model.layers, plan, strict=True):
        attn = layer.self_attn
        assert isinstance(attn, arch.MethodAttention) and attn.method == method
        assert attn.rope == (method == "softmax")
        assert (attn.beta_proj is not None) == (method == "gated_delta")
    assert arch.describe(plan) == "gated_delta x2 + softmax x2 (softmax-family layers 1,3)"
    assert arch.layer_methods(build_model(tiny())) == ["sdpa"] * LAYERS  # no plan: plain Llama layers


@pytest.mark.parametrize(
    "name", ["sliding_window", "lightning", "gated_delta", "based", "hybrid", "gla", "linear"]
)
def test_cached_decode_equals_the_full_forward(name: str) -> None:
    plan = PLANS.get(name) or arch.uniform(name, LAYERS)
    params = {"sliding_window": {"window": 8}} if name == "sliding_window" else {}
    model = build_model(tiny(plan, params)).eval()
    ids = torch.randint(2, 500, (1, 24))
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -3:]
        out = model(input_ids=ids[:, :21], use_cache=True)
        rows = []
        for j in range(21, 24):
            out = model(input_ids=ids[:, j : j + 1], past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(rows), full, atol=1e-5, rtol=1e-5)


def test_state_bytes_match_the_real_states() -> None:
    b, h, h_kv, n, d = 1, 4, 2, 40, 16
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h_kv, n, d), torch.randn(b, h_kv, n, d)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("lightning", {}),
        ("gated_delta", {"beta": torch.rand(b, h, n), "g": -torch.rand(b, h, n, 1)}),
        ("gla", {"g": -torch.rand(b, h, n, d)}),
        ("linear", {}),
    ]
    for method, extra in cases:
        result = attnlab.prepare(method, causal=True)(q, k, v, **extra)
        assert isinstance(result, Result)  # stateful methods return the state beside the output
        state = result.state
        tensors = [state] if isinstance(state, torch.Tensor) else list(state)
        assert sum(t.numel() * 4 for t in tensors) == arch.state_bytes(method, {}, n, h, h_kv, d), method
    f = arch.BASED_FEATURE_DIM
    result = attnlab.prepare("based", causal=True)(q[..., :f], k[..., :f], v)
    assert isinstance(result, Result)
    state = result.state
    assert sum(t.numel() * 4 for t in state) == arch.state_bytes("based", {}, n, h, h_kv, d)
    # softmax / sliding window: the KV cache a softmax organism's forward leaves, per layer
    cfg = tiny(arch.uniform("softmax", LAYERS))
    model = build_model(cfg).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(2, 500, (1, 50)), use_cache=True).past_key_values
    per_layer = [(layer.keys.numel() + layer.values.numel()) * 4 for layer in cache.layers]
    assert per_layer == arch.plan_state_bytes(cfg.model, 50)
    assert arch.state_bytes("sliding_window", {"window": 16}, 50, 2, 1, 16) == 2 * 1 * 16 * 16 * 4
    assert arch.state_bytes("sliding_window", {"window": 64}, 50, 2, 1, 16) == 2 * 1 * 50 * 16 * 4


def test_adapted_run_trains_saves_and_resumes(tmp_path: Path) -> None:
    plan = PLANS["hybrid"]
    train(tiny(plan, stages=[[1, 256, 2]]), tmp_path, resume=False)
    longer = tiny(plan, stages=[[1, 256, 2], [1, 256, 2]])
    result = train(longer, tmp_path, resume=True)
    assert result.state["step"] == 2 and all(math.isfinite(c["loss"]) for c in result.state["curve"])
    assert list(result.state["config"]["model"]["attention"]) == list(plan)
    assert set(result.state["task_accuracy"]) == {"passkey", "mqar"}
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert ckpt.read_state(tmp_path / "final")["config"]["model"]["attention"] == list(plan)
    loaded, tok = arch.load_organism(tmp_path / "final")
    assert arch.layer_methods(loaded) == list(plan) and len(tok) == 500
    with pytest.raises(
        CheckpointError, match="trained with attnlab attention layers .*architectures.load_organism"
    ):
        ckpt.load_organism(tmp_path / "final")  # a plain load would silently run softmax everywhere
    fresh = build_model(longer)
    assert fresh.load_state_dict(loaded.state_dict()) is not None  # same keys, input makers included
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.beta_proj.weight" in saved
    assert torch.equal(
        loaded.model.layers[0].self_attn.beta_proj.weight.detach(),
        saved["model.layers.0.self_attn.beta_proj.weight"],
    )


@pytest.mark.parametrize(
    ("plan", "params", "match"),
    [
        (("softmx", "softmax"), {}, r"layer 0: unknown method 'softmx'.*expected one of"),
        (("softmax",), {}, r"names 1 layers; the model has layers=2"),
        (("lowrank_bias", "softmax"), {}, r"requires the tensor input\(s\) \['u', 'vf'\]"),
        (("softmax", "softmax"), {"lightning": {}}, r"names 'lightning', which no layer"),
        (
            ("sliding_window",) * 2,
            {"sliding_window": {"window": 0}},
            r"attention_params\['sliding_window'\].*window",
        ),
        ((), {"softmax": {}}, r"without a model attention plan"),
    ],
)
def test_bad_plans_get_clear_errors(
    plan: tuple[str, ...], params: dict[str, dict[str, object]], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny(plan, params)


def test_a_linear_method_without_its_inputs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arch, "INPUT_MAKERS", {"gla": ("g",)})
    with pytest.raises(ConfigError, match=r"'gated_delta' requires the tensor input\(s\) \['beta'\]"):
        ModelConfig(layers=2, attention=("gated_delta", "softmax")).validate()


def test_mqar_batch_layout_and_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    keys, values = (4, 40), (40, 60)
    x, y = arch.mqar_batch(gen, 8, 64, 9, keys, values, pad=0)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.long
    for row in range(8):
        ks, vs = x[row, 0:18:2].tolist(), x[row, 1:18:2].tolist()
        assert len(set(ks)) == 9 and all(keys[0] <= k < keys[1] for k in ks)
        assert all(values[0] <= v < values[1] for v in vs)
        qk, qv = x[row, 18:36:2].tolist(), x[row, 19:36:2].tolist()
        assert sorted(qk) == sorted(ks)  # every key asked once
        value_of = dict(zip(ks, vs, strict=True))
        assert qv == [value_of[k] for k in qk]  # each query followed by its own value
        assert (x[row, 36:] == 0).all()
        labelled = (y[row] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(18, 36, 2))  # only the query keys, labelled with their value
        assert y[row, 18:36:2].tolist() == qv
    again = arch.mqar_batch(torch.Generator().manual_seed(0), 8, 64, 9, keys, values, pad=0)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


@pytest.mark.parametrize(
    ("pairs", "length", "keys", "values", "message"),
    [
        (17, 64, (4, 40), (40, 60), "pairs=17 at length=64"),
        (4, 64, (4, 6), (40, 60), "holds 2 ids"),
        (4, 64, (4, 50), (40, 60), "overlap"),
        (4, 64, (9, 4), (40, 60), "keys=(9, 4)"),
    ],
)
def test_mqar_batch_bad_arguments(
    pairs: int, length: int, keys: tuple[int, int], values: tuple[int, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        arch.mqar_batch(torch.Generator(), 2, length, pairs, keys, values, pad=0)


def test_short_conv_is_causal_trains_and_refuses_cached_decoding() -> None:
    cfg = tiny(PLANS["hybrid"]).model
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = arch.add_short_conv(arch.apply(LlamaForCausalLM(cfg.llama_config()), cfg), 3)
    assert all(isinstance(layer.input_layernorm, arch.ShortConv) for layer in model.model.layers)
    x = torch.randint(4, 500, (1, 32))
    x2 = x.clone()
    x2[0, 20:] = torch.randint(4, 500, (12,))
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=x2).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])  # later tokens change nothing before them
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    model(input_ids=x).logits.sum().backward()
    convs = [layer.input_layernorm.conv.weight.grad for layer in model.model.layers]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in convs)
    with pytest.raises(ConfigError, match="short input convolution"):
        model(input_ids=x, use_cache=True)


def test_short_conv_bad_arguments() -> None:
    from transformers import LlamaForCausalLM

    cfg = tiny(PLANS["softmax"]).model
    model = arch.apply(LlamaForCausalLM(cfg.llama_config()), cfg)
    with pytest.raises(ConfigError, match="kernel=1"):
        arch.add_short_conv(model, 1)
    plain = LlamaForCausalLM(tiny().model.llama_config())
    with pytest.raises(ConfigError, match="plain Llama layers"):
        arch.add_short_conv(plain, 3)


def without_output_norm(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, linear_output_norm=False))


@pytest.mark.parametrize("name", ["gated_delta", "lightning", "gla", "based", "softmax"])
def test_output_norm_on_the_linear_layers_without_a_normaliser(name: str) -> None:
    torch.manual_seed(0)
    normed = build_model(tiny(arch.uniform(name, LAYERS))).eval()
    plain = build_model(without_output_norm(tiny(arch.uniform(name, LAYERS)))).eval()
    for layer in plain.model.layers:
        assert layer.self_attn.o_norm is None
    has = name in arch.OUTPUT_NORM
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in normed.model.layers:
        attn = layer.self_attn
        assert (attn.o_norm is not None) == has
        if has:
            assert attn.o_norm.weight.shape == (attn.head_dim,) and bool((attn.o_norm.weight == 1).all())
            norm = attn.o_norm
            norm.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        normed(input_ids=torch.randint(2, 500, (2, 24)))
    assert len(seen) == (LAYERS if has else 0)
    for raw, out in seen:  # the method's (B, H, N, D) output, each head and token RMS-normalised over D
        assert raw.shape == (2, 2, 24, 16)
        want = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + arch.OUTPUT_NORM_EPS)
        torch.testing.assert_close(out, want)
        assert float(out.pow(2).mean().sqrt()) > 3 * float(raw.pow(2).mean().sqrt())
    if has:  # the norm's gain is a trained parameter, saved with the model
        assert "model.layers.0.self_attn.o_norm.weight" in dict(normed.named_parameters())


def test_a_checkpoint_saved_before_the_output_norm_loads_without_it(tmp_path: Path) -> None:
    import json

    plan = PLANS["gated_delta"]
    train(without_output_norm(tiny(plan, stages=[[1, 256, 2]])), tmp_path, resume=False)
    state_file = tmp_path / "final" / "training.json"
    state = json.loads(state_file.read_text())
    del state["config"]["model"]["linear_output_norm"]  # as written before the option existed
    state_file.write_text(json.dumps(state))
    loaded, _ = arch.load_organism(tmp_path / "final")
    assert all(layer.self_attn.o_norm is None for layer in loaded.model.layers)
    with pytest.raises(ConfigError, match="linear_output_norm='yes': expected true or false"):
        ModelConfig(linear_output_norm="yes").validate()  # type: ignore[arg-type]
