"""attnlab.hf plans: schema (dict, JSON, YAML), per-layer and per-head methods (GQA-aware), and every
bad input refused before anything runs with a message naming what was given and what is expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlab  # noqa: E402
from attnlab.hf import HFRuntimeError, PlanError, Runtime, UnsupportedModelError, load_plan, use  # noqa: E402
from attnlab.hf.plan import MethodRef  # noqa: E402
from attnlab.hf.testing import build, fast_plan, ids  # noqa: E402

FAST = fast_plan()


def test_plan_schema_from_dict_json_and_yaml(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "default": "streaming",
        "prefill_params": {"window": 64},
        "layers": {0: "softmax", "2-3": {"decode": "sliding_window"}},
        "heads": {"1": {5: "softmax", "6-7": {"prefill": {"method": "dilated", "params": {"dilation": 3}}}}},
    }
    plan = load_plan(data)
    assert plan.prefill == MethodRef("streaming", (("window", 64),))
    assert plan.decode == MethodRef("streaming")  # a bare static method applies to both phases
    assert plan.method(0, 3, "prefill") == (MethodRef("softmax"), True)
    assert plan.method(2, 0, "decode") == (MethodRef("sliding_window"), True)
    assert plan.method(3, 0, "prefill") == (plan.prefill, False)  # the layer entry names decode only
    assert plan.method(1, 5, "decode") == (MethodRef("softmax"), True)
    assert plan.method(1, 7, "prefill") == (MethodRef("dilated", (("dilation", 3),)), True)
    assert plan.method(1, 7, "decode") == (plan.decode, False)
    # use()'s keywords replace the defaults; a dynamic method as a bare entry is prefill-only
    plan2 = load_plan(data, prefill="vertical_slash", decode="softmax")
    assert plan2.prefill.name == "vertical_slash" and plan2.decode == MethodRef("softmax")
    assert load_plan({"layers": {0: "block_topk"}}).layers[0].decode is None
    js = tmp_path / "plan.json"
    js.write_text(json.dumps({**data, "layers": {"0": "softmax", "2-3": {"decode": "sliding_window"}}}))
    assert load_plan(js) == plan
    yml = tmp_path / "plan.yaml"
    yml.write_text(
        "default: streaming\nprefill_params: {window: 64}\nlayers:\n  0: softmax\n  2-3: {decode: sliding_window}\n"
        "heads:\n  1:\n    5: softmax\n    6-7: {prefill: {method: dilated, params: {dilation: 3}}}\n"
    )
    assert load_plan(yml) == plan


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (
            {"prefill": "streamin"},
            r"unknown attention method 'streamin' for prefill\. Did you mean 'streaming'\?",
        ),
        ({"decode": "vertical_slash"}, r"'vertical_slash' cannot run in decode: it is a prefill-only method"),
        ({"prefill": "gla"}, None),  # linear: unknown here unless registered; either way refused
        ({"prefill": {"method": "streaming", "params": {"windw": 3}}}, r"has no parameter 'windw'.*'window'"),
        ({"prefill": {"method": "streaming", "params": {"window": 0}}}, r"window=0 is invalid"),
        ({"prefil": "softmax"}, r"plan has no key 'prefil'\. Did you mean 'prefill'\?"),
        ({"layers": {"a-b": "softmax"}}, r"index 'a-b' is not an integer or an inclusive range"),
        ({"layers": {"5-2": "softmax"}}, r"index '5-2' is not an integer"),
        ({"prefill": {"name": "softmax"}}, r"a method is a name or \{'method': name"),
        ({"sliding": "drop"}, r"'sliding' must be 'keep' or 'override'"),
        ({"backends": {"softmax": "flexx"}}, r"has no backend 'flexx'\. Did you mean 'flex'\?"),
    ],
)
def test_bad_plans_are_refused_with_clear_messages(plan: dict[str, Any], match: str | None) -> None:
    with pytest.raises(PlanError, match=match):
        load_plan(plan)


def test_plan_checked_against_the_model_before_anything_runs() -> None:
    model = build("llama3")  # 2 layers, 8 query heads, 2 KV heads
    match = r"names layer 2, but the model has 2 attention layers \(0\.\.1\)"
    with pytest.raises(PlanError, match=match), use(model, plan={"layers": {2: "softmax"}}):
        pass
    match = r"heads\[1\] names query head 8, but the model has 8 query heads"
    with pytest.raises(PlanError, match=match), use(model, plan={"heads": {1: {8: "softmax"}}}):
        pass
    with pytest.raises(PlanError, match=r"names layer 5"), use(model, plan={"heads": {5: {0: "softmax"}}}):
        pass
    assert model.config._attn_implementation == "sdpa"
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    )
    with (
        pytest.raises(
            UnsupportedModelError, match=r"attention class GPT2Attention.*supported.*LlamaAttention"
        ),
        use(gpt2),
    ):
        pass


def test_per_head_plan_runs_each_head_group_through_its_method() -> None:
    """GQA 4:1 with 8 query heads (KV groups {0..3}, {4..7}); heads of one group differ; the output of each
    head equals its own method run alone on that head."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 10, 64, generator=g)
    k = torch.randn(2, 2, 10, 64, generator=g)
    v = torch.randn(2, 2, 10, 64, generator=g)
    methods: dict[int, tuple[str, dict[str, Any]]] = {
        0: ("streaming", {"sinks": 1, "window": 3}),
        2: ("sliding_window", {"window": 2}),
    }
    plan = load_plan(
        {
            **FAST,
            "default": "softmax",
            "heads": {
                0: {h: {"method": m, "params": p} for h, (m, p) in methods.items()} | {"4-7": "dilated"}
            },
        }
    )
    rt = Runtime(plan)
    module = type("LlamaAttention", (torch.nn.Module,), {"layer_idx": 0})()  # what the runtime reads
    out, _ = rt.forward(module, q, k, v, None, scaling=0.1)
    assert out.shape == (2, 10, 8, 64)
    for h in range(8):
        name, params = methods.get(h, ("dilated", {}) if h >= 4 else ("softmax", {}))
        want = attnlab.attention(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1],
                                 method=name, causal=True, scale=0.1, backend="reference", **params)  # fmt: skip
        torch.testing.assert_close(out[:, :, h], want[:, 0], rtol=1e-5, atol=1e-5, msg=f"head {h} ({name})")
    parts = rt.parts(0, "prefill", 8, 2, None, None, 0.1)
    by_method = {p.ref.name: p for p in parts}
    assert by_method["dilated"].kv_heads == (1,)  # a whole KV group keeps GQA
    assert by_method["softmax"].heads == (1, 3) and by_method["softmax"].kv_heads == (0, 0)


def test_per_layer_plan_in_a_model() -> None:
    model = build("llama3")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        plan = {**FAST, "default": {"method": "streaming", "params": {"sinks": 1, "window": 3}},
                "layers": {0: "softmax", 1: "softmax"}}  # fmt: skip
        with use(model, plan=plan) as rt:
            same = model(x).logits
        with use(
            model, plan={**FAST, "heads": {1: {5: {"method": "streaming", "params": {"window": 2}}}}}
        ) as rt2:
            changed = model(x).logits
    torch.testing.assert_close(same, want, rtol=1e-5, atol=1e-5)
    assert set(m for (_, _, m) in rt.calls) == {"softmax"}
    assert rt2.calls[(1, "prefill", "streaming")] == 1 and rt2.calls[(1, "prefill", "softmax")] == 1
    assert (changed - want).abs().max() > 1e-4  # one head of the last layer changed the logits


def test_materialised_masks_and_holes_in_padding_are_refused() -> None:
    model = build("llama3")
    x = ids(batch=2, n=8)
    holes = torch.ones_like(x)
    holes[0, 3] = 0
    with (
        pytest.raises(HFRuntimeError, match=r"sequence 0 .* holes .* use left padding"),
        use(model, plan=FAST),
    ):
        model(x, attention_mask=holes)
    mask4d = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(HFRuntimeError, match=r"materialised attention mask"), use(model, plan=FAST):
        model(x, attention_mask=mask4d)
    assert model.config._attn_implementation == "sdpa"
