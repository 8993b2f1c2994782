"""attnlab.hf: softmax through the integration equals transformers' own attention; use() restores
everything, also when generation raises; register() makes attn_implementation="attnlab" available."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from attnlab.hf import register, unregister, use  # noqa: E402
from attnlab.hf.testing import build, fast_plan, ids  # noqa: E402

FAST = fast_plan()


def test_softmax_logits_equal_sdpa_llama3() -> None:
    model = build("llama3")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        with use(model) as rt:
            got = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rt.calls[(0, "prefill", "softmax")] == 1 and rt.calls[(1, "prefill", "softmax")] == 1
    assert model.config._attn_implementation == "sdpa"


def test_use_restores_everything_when_generation_raises() -> None:
    model = build("llama3")
    before_attn = dict(AttentionInterface._global_mapping)
    before_mask = dict(AttentionMaskInterface._global_mapping)

    class Boom(RuntimeError):
        pass

    def fail(*args: object, **kwargs: object) -> None:
        raise Boom

    hook = model.model.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(Boom), use(model, prefill="streaming", prefill_params={"window": 4}, plan=FAST):
            assert model.config._attn_implementation.startswith("attnlab_use_")
            model.generate(ids(), max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert model.config._attn_implementation == "sdpa"
    assert dict(AttentionInterface._global_mapping) == before_attn
    assert dict(AttentionMaskInterface._global_mapping) == before_mask
    # a bad plan fails before anything is changed
    with (
        pytest.raises(ValueError, match="unknown attention method 'streamin'"),
        use(model, prefill="streamin"),
    ):
        pass
    assert model.config._attn_implementation == "sdpa"
    assert dict(AttentionInterface._global_mapping) == before_attn


def test_greedy_generation_matches_sdpa() -> None:
    model = build("llama3")
    x = ids(batch=1, n=10)
    want = model.generate(x, max_new_tokens=6, do_sample=False)
    with use(model, prefill="softmax", decode="softmax") as rt:
        got = model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert rt.calls[(0, "decode", "softmax")] == 5  # 6 new tokens: 1 from the prefill, 5 decode steps


def test_register_attn_implementation_attnlab() -> None:
    assert "attnlab" not in AttentionInterface._global_mapping  # nothing registered at import
    ref = build("qwen3")
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
    register()
    try:
        model = build("qwen3", attn="attnlab")
        assert model.config._attn_implementation == "attnlab"
        with torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        unregister()
    assert "attnlab" not in AttentionInterface._global_mapping
    assert "attnlab" not in AttentionMaskInterface._global_mapping
