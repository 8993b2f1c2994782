"""attnlab.hf review fixes: decode state kept per KV cache (two caches or two models never share it, a cache
that shrank starts over), assisted generation and positional beam configs refused, list parameters from
JSON / YAML plans, retrieval heads of per-head plans named by the model's KV heads, nested ``use`` and
``free_kv`` guards, register()'s model checks, kv_memory of layers mixing methods per head, Gemma-3
multimodal models, and an explicit ``softcap`` keeping the model's cap and window."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlab  # noqa: E402
from attnlab.hf import HFRuntimeError, PlanError, kv_memory, register, unregister, use  # noqa: E402
from attnlab.hf.models import tiny_config  # noqa: E402
from attnlab.hf.testing import build, fast_plan, ids  # noqa: E402
from attnlab.registry import registered  # noqa: E402

FAST = fast_plan()
PAGES = {"budget": 8, "page": 4}


@contextlib.contextmanager
def decode_methods() -> Iterator[None]:
    """The decode methods of attnlab.catalog.decode, registered for the block where they are not yet."""
    from attnlab.catalog.decode import SPECS

    with contextlib.ExitStack() as stack:
        for spec in SPECS:
            if spec.name not in attnlab.methods():
                stack.enter_context(registered(spec))
        yield


def steps(model: Any, prompts: list[torch.Tensor], n: int = 5) -> list[torch.Tensor]:
    """Greedy decoding by hand, one cache per prompt, the prompts' steps interleaved: per prompt the last
    position's logits of its prefill and of each of its ``n`` steps."""
    caches = [transformers.DynamicCache(config=model.config) for _ in prompts]
    outs: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            outs[i].append(model(input_ids=p, past_key_values=caches[i]).logits[:, -1])
        for _ in range(n):
            for i in range(len(prompts)):
                nxt = outs[i][-1].argmax(-1, keepdim=True)
                outs[i].append(model(input_ids=nxt, past_key_values=caches[i]).logits[:, -1])
    return [torch.stack(o) for o in outs]


def greedy(model: Any, x: torch.Tensor, new: int = 5, **kw: Any) -> Any:
    return model.generate(x, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          **kw)  # fmt: skip


def same(a: Any, b: Any) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y)


# -- 1. decode state per cache -----------------------------------------------------------------------------


def test_two_caches_stepped_alternately_keep_their_own_decode_state() -> None:
    model = build("llama3")
    a, b = ids(1, 24, seed=1), ids(1, 24, seed=2)
    with decode_methods(), use(model, decode="page_topk", decode_params=PAGES, plan=FAST):
        a_alone, b_alone = steps(model, [a])[0], steps(model, [b])[0]
        a_both, b_both = steps(model, [a, b])
    torch.testing.assert_close(a_both, a_alone)
    torch.testing.assert_close(b_both, b_alone)


def test_a_cache_that_shrank_starts_its_decode_state_over() -> None:
    """A cache cropped below the length its decode state covers (a new continuation of a shorter prefix)
    gets a fresh state: the same step as on a fresh copy of the cropped cache."""
    model = build("llama3")
    x = ids(1, 24, seed=1)
    with decode_methods(), use(model, decode="page_topk", decode_params=PAGES, plan=FAST), torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=x[:, :20], past_key_values=cache)
        for i in range(20, 24):
            model(input_ids=x[:, i : i + 1], past_key_values=cache)
        cache.crop(-6)  # 24 -> 18 tokens
        fresh = copy.deepcopy(cache)
        want = model(input_ids=x[:, 18:19], past_key_values=fresh).logits
        got = model(input_ids=x[:, 18:19], past_key_values=cache).logits
    torch.testing.assert_close(got, want)


def test_register_keeps_decode_state_per_model_and_per_cache() -> None:
    """Under register(): two models stepped alternately do not read each other's state, and a generate from
    a cached prefix after another generate gives what it gives alone (there is no generate guard)."""
    register(decode="page_topk", decode_params=PAGES, plan=FAST)
    try:
        a = build("llama3", attn="attnlab", seed=0)
        b = build("llama3", attn="attnlab", seed=1)
        x = ids(1, 24, seed=3)
        b_alone = steps(b, [x])[0]
        with torch.no_grad():
            prefix = transformers.DynamicCache(config=a.config)
            a(input_ids=x[:, :16], past_key_values=prefix)
        alone = greedy(a, x[:, :20], past_key_values=copy.deepcopy(prefix))
        greedy(a, x[:, :22], new=12)
        after = greedy(a, x[:, :20], past_key_values=copy.deepcopy(prefix))
        same(after, alone)
        # the two models' decode steps interleaved by hand (one step of a, one of b, ...)
        caches = {m: transformers.DynamicCache(config=m.config) for m in (a, b)}
        outs: dict[Any, list[torch.Tensor]] = {a: [], b: []}
        with torch.no_grad():
            for m in (a, b):
                outs[m].append(m(input_ids=x, past_key_values=caches[m]).logits[:, -1])
            for _ in range(5):
                for m in (a, b):
                    nxt = outs[m][-1].argmax(-1, keepdim=True)
                    outs[m].append(m(input_ids=nxt, past_key_values=caches[m]).logits[:, -1])
        torch.testing.assert_close(torch.stack(outs[b]), b_alone)
    finally:
        unregister()


def test_register_first_call_a_decode_step_keeps_its_state() -> None:
    """A registered runtime learns a call's cache from the attention module's next call on: a model whose
    first attnlab call is a decode step (a prefix cached under sdpa) keeps that step's state for its cache,
    as under use() (h2o decides its kept tokens at that step)."""
    h2o: dict[str, Any] = {"decode": "h2o", "decode_params": {"budget": 8, "recent": 2}, "plan": FAST}
    x = ids(1, 24, seed=3)
    outs = []
    for how in ("use", "register"):
        model = build("llama3")
        with torch.no_grad():
            prefix = transformers.DynamicCache(config=model.config)
            model(input_ids=x[:, :16], past_key_values=prefix)
        if how == "use":
            with decode_methods(), use(model, **h2o):
                outs.append(greedy(model, x, past_key_values=prefix))
            continue
        with decode_methods():
            register(**h2o)
            try:
                model.set_attn_implementation("attnlab")
                outs.append(greedy(model, x, past_key_values=prefix))
            finally:
                unregister()
    same(outs[1], outs[0])


def test_decode_state_does_not_keep_a_cache_alive() -> None:
    import gc
    import weakref

    model = build("llama3")
    with decode_methods(), use(model, decode="page_topk", decode_params=PAGES, plan=FAST) as rt:
        out = model.generate(ids(1, 16), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = weakref.ref(out.past_key_values)
        assert rt.cache_state(out.past_key_values) is not None and rt.states
        del out
        gc.collect()
        assert cache() is None
        assert not len(rt._caches)  # its entry went with it (the last call's states stay readable)
        assert rt.states


# -- 2. assisted generation --------------------------------------------------------------------------------


def test_assisted_generation_is_refused_with_a_stateful_decode_method() -> None:
    """Prompt lookup and assisted generation crop the cache after rejected candidates, which the decode
    state would not follow: refused (keyword, generation config or assistant model) like beam search."""
    model = build("llama3")
    x = ids(1, 12)
    cfg = transformers.GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=3, do_sample=False)
    with decode_methods(), use(model, decode="page_topk", decode_params=PAGES, plan=FAST):
        with pytest.raises(HFRuntimeError, match=r"prompt_lookup_num_tokens.*page_topk"):
            model.generate(x, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=3)
        with pytest.raises(HFRuntimeError, match=r"prompt_lookup_num_tokens"):
            model.generate(x, generation_config=cfg)
        with pytest.raises(HFRuntimeError, match=r"assistant_model"):
            model.generate(x, max_new_tokens=3, do_sample=False, assistant_model=build("llama3", seed=1))
        with pytest.raises(HFRuntimeError, match=r"assistant_early_exit"):
            model.generate(x, max_new_tokens=3, do_sample=False, assistant_early_exit=1)
    window = {"sinks": 2, "window": 8}
    with (  # compaction cannot follow a crop either
        use(model, decode="streaming", decode_params=window, plan=FAST, free_kv=True),
        pytest.raises(HFRuntimeError, match=r"prompt_lookup_num_tokens=3.*free_kv"),
    ):
        model.generate(x, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=3)
    with use(model, plan=FAST):  # stateless: assisted generation runs
        got = model.generate(x, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(got, model.generate(x, max_new_tokens=3, do_sample=False))


# -- 3. list parameters ------------------------------------------------------------------------------------


def test_list_parameters_of_json_and_dict_plans_run(tmp_path: Path) -> None:
    model = build("llama3", layers=1, heads=8, kv_heads=4)
    x = ids(1, 20)
    want_params = {"budget": 8, "sink": 2, "heads": (0,)}
    with decode_methods():
        with use(model, decode="retrieval_heads_kv", decode_params=want_params, plan=FAST):
            want = greedy(model, x)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({"decode": {"method": "retrieval_heads_kv", "params": {**want_params,
                                                                                         "heads": [0]}}, **FAST}))  # fmt: skip
        for kw in (
            {"plan": str(path)},
            {"decode": "retrieval_heads_kv", "decode_params": {**want_params, "heads": [0]}, "plan": FAST},
        ):
            with use(model, **kw):
                same(greedy(model, x), want)


# -- 4. retrieval heads in per-head plans ------------------------------------------------------------------


def _retrieval(heads: list[int]) -> dict[str, Any]:
    return {"decode": {"method": "retrieval_heads_kv", "params": {"budget": 4, "sink": 1, "heads": heads}}}


def test_retrieval_heads_of_a_per_head_plan_are_the_models_kv_heads() -> None:
    """Query heads 4-7 of a model with 4 KV heads (group 2) use KV heads 2 and 3: ``heads=[3]`` there makes
    KV head 3 (query heads 6, 7) a retrieval head; a KV head outside the part, or one the model lacks, is
    refused before anything runs."""
    model = build("llama3", layers=1, heads=8, kv_heads=4)
    x = ids(1, 20)
    with decode_methods():
        with use(model, plan={**FAST, "heads": {0: {"4-5": _retrieval([]), "6-7": "softmax"}}}):
            want = greedy(model, x)
        with use(model, plan={**FAST, "heads": {0: {"4-7": _retrieval([3])}}}):
            same(greedy(model, x), want)
        outside = {**FAST, "heads": {0: {"4-7": _retrieval([1])}}}
        with (
            pytest.raises(PlanError, match=r"KV head 1.*query heads 4-7.*KV heads 2, 3"),
            use(model, plan=outside),
        ):
            pass
        missing = {"budget": 8, "heads": (5,)}
        with (
            pytest.raises(PlanError, match=r"KV head 5.*4 KV heads"),
            use(model, decode_params=missing, decode="retrieval_heads_kv", plan=FAST),
        ):
            pass


# -- 5, 6. the generate guard ------------------------------------------------------------------------------


def test_nested_use_guards_generate_with_the_inner_runtime() -> None:
    model = build("llama3")
    x = ids(1, 30, seed=3)
    with torch.no_grad():
        prefix = transformers.DynamicCache(config=model.config)
        model(input_ids=x[:, :20], past_key_values=prefix)
    recycled: dict[str, Any] = {
        "decode": "recycled",
        "decode_params": {"budget": 8, "stride": 3},
        "plan": FAST,
    }
    with decode_methods():
        with use(model, **recycled):
            model.generate(x[:, :25], max_new_tokens=12, do_sample=False)
            want = greedy(model, x, past_key_values=copy.deepcopy(prefix))
        with use(model, decode="page_topk", decode_params=PAGES, plan=FAST):
            outer = model.generate
            with use(model, **recycled):
                model.generate(x[:, :25], max_new_tokens=12, do_sample=False)
                got = greedy(model, x, past_key_values=copy.deepcopy(prefix))
            assert model.generate == outer  # the outer block's guard is back
        assert "generate" not in vars(model)
    same(got, want)


def test_free_kv_with_a_sink_and_window_method_guards_generate() -> None:
    model = build("llama3")
    x = ids(1, 30, seed=3)
    with torch.no_grad():
        prefix = transformers.DynamicCache(config=model.config)
        model(input_ids=x[:, :20], past_key_values=prefix)
    window = {"sinks": 2, "window": 8}
    with use(model, decode="streaming", decode_params=window, plan=FAST, free_kv=True) as rt:
        assert "generate" in vars(model)
        alone = greedy(model, x, past_key_values=copy.deepcopy(prefix))
        long = model.generate(x[:, :25], max_new_tokens=80, do_sample=False, return_dict_in_generate=True)
        own = rt.cache_state(long.past_key_values)
        assert own is not None and own.compacted and rt.compacted  # it dropped its middle
        same(greedy(model, x, past_key_values=copy.deepcopy(prefix)), alone)
    assert "generate" not in vars(model)


# -- 7. register() checks the plan against each model ------------------------------------------------------


def test_register_checks_the_model_dependent_plan() -> None:
    model = build("llama3")
    x = ids(1, 16)
    with decode_methods():
        register(decode="tidal", decode_params={"budget": 8}, plan=FAST)
        try:
            model.set_attn_implementation("attnlab")
            with pytest.raises(PlanError, match="no layer with role 'select'"):
                model.generate(x, max_new_tokens=3, do_sample=False)
        finally:
            unregister()
            model.set_attn_implementation("sdpa")


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama3", {}),
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
        ("gemma2", {"sliding_window": 5}),
        ("gemma3", {}),
        ("phi3", {}),
    ],
)
def test_a_model_read_from_one_attention_module_is_what_inspect_model_reads(
    arch: str, overrides: dict[str, Any]
) -> None:
    """register() checks each model from its first attention module's config: the same layers, windows, caps
    and heads as inspect_model reads from the whole model."""
    from attnlab.hf.models import attention_modules, info_from_module, inspect_model

    model = build(arch, attn="eager", layers=3, **overrides)
    want = inspect_model(model)
    for module in attention_modules(model):
        assert info_from_module(module) == want


# -- 8. beam search with a positional generation config ----------------------------------------------------


def test_beam_search_is_refused_with_a_positional_generation_config() -> None:
    model = build("llama3")
    cfg = transformers.GenerationConfig(num_beams=3, max_new_tokens=3, do_sample=False)
    with (
        decode_methods(),
        use(model, decode="page_topk", decode_params=PAGES, plan=FAST),
        pytest.raises(HFRuntimeError, match=r"num_beams=3"),
    ):
        model.generate(ids(1, 12), cfg)


# -- 9. kv_memory of a layer mixing methods per head -------------------------------------------------------


def test_kv_memory_of_a_layer_mixing_methods_per_head() -> None:
    model = build("llama3", layers=1, heads=8, kv_heads=4)
    h2o = {"decode": {"method": "h2o", "params": {"budget": 8, "per_step": True}}}
    with decode_methods(), use(model, plan={**FAST, "heads": {0: {"0-3": h2o}}}) as rt:
        out = model.generate(ids(1, 40), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    (mem,) = kv_memory(out.past_key_values, rt)
    keys = out.past_key_values.layers[0].keys
    per_token = 2 * keys.shape[3] * keys.element_size()
    # KV heads 0, 1 (query heads 0-3): h2o's 8 kept tokens; KV heads 2, 3: softmax, every token
    assert mem.tokens == 43
    assert mem.kept == (2 * 8 + 2 * 43) * per_token


# -- 10. Gemma-3 multimodal --------------------------------------------------------------------------------


def _gemma3_multimodal() -> Any:
    text = tiny_config("gemma3", layers=2, vocab=300)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=299, boi_token_index=297, eoi_token_index=298)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(cfg).eval()


def test_gemma3_multimodal_runs_text_and_refuses_images_up_front() -> None:
    model = _gemma3_multimodal()
    model.set_attn_implementation("eager")
    x = torch.tensor([[5, 6, 297] + [299] * 4 + [298, 7, 8, 9]])
    pixels = torch.randn(1, 3, 28, 28)
    vision_calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))
    try:
        with torch.no_grad():
            want = model(input_ids=x[:, 8:]).logits
            with use(model, plan=FAST):
                vision_cfg = model.model.vision_tower.config
                assert vision_cfg._attn_implementation == "eager"  # the vision tower keeps its attention
                with pytest.raises(HFRuntimeError, match="pixel_values"):
                    model(input_ids=x, pixel_values=pixels, token_type_ids=(x == 299).long())
                with pytest.raises(HFRuntimeError, match="pixel_values"):
                    model.generate(x, pixel_values=pixels, token_type_ids=(x == 299).long(), max_new_tokens=2)
                assert not vision_calls  # refused before the vision tower ran
                got = model(input_ids=x[:, 8:]).logits
        torch.testing.assert_close(got, want)
    finally:
        hook.remove()


# -- 11. an explicit softcap on a soft-capped model --------------------------------------------------------


def test_an_explicit_softcap_keeps_the_models_cap_and_window() -> None:
    model = build("gemma2", attn="eager", attn_logit_softcapping=5.0, sliding_window=6)
    x = ids(1, 20)
    with torch.no_grad():
        want = model(input_ids=x).logits
        for method in ("softcap", {"method": "softcap", "params": {"cap": 5.0}}):
            with use(model, plan={**FAST, "layers": {"0-1": method}}):
                torch.testing.assert_close(model(input_ids=x).logits, want)
        with use(model, plan={**FAST, "layers": {"0-1": {"method": "softcap", "params": {"cap": 2.0}}}}):
            assert not torch.allclose(model(input_ids=x).logits, want)  # a cap the plan gives is kept
