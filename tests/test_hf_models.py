"""attnlab.hf on every supported architecture (config-built: real head dims and GQA ratios, 2 layers):
softmax equals transformers' attention on left-padded batches, in prefill and in greedy generation; the
model's sliding window and soft cap are kept; every sparse prefill method at full budget equals dense."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlab  # noqa: E402
from attnlab.hf import PlanError, tiny_config, use  # noqa: E402
from attnlab.hf.models import ARCHITECTURES  # noqa: E402
from attnlab.hf.testing import fast_plan, padded  # noqa: E402

FAST = fast_plan()

#: Gemma 2 soft-caps its logits, which transformers' sdpa refuses: its baseline is eager attention
BASELINE = {"gemma2": "eager"}
#: small windows that bite on the 12-token prompts below (Mistral, Gemma 2 and 3: Gemma 2's sliding layers
#: run softcap with the window)
WINDOWS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 5},
    "gemma2": {"sliding_window": 5},
    "gemma3": {"sliding_window": 5},
}


def build(arch: str, seed: int = 0, attn: str | None = None, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **{**WINDOWS.get(arch, {}), **overrides})
    attn = attn or BASELINE.get(arch, "sdpa")
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_softmax_equals_transformers_on_a_left_padded_batch(arch: str) -> None:
    model = build(arch)
    ids, mask = padded()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with use(model, plan=FAST) as rt:
            got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=2e-5)
    windows = {layer.sliding_window for layer in attnlab.hf.inspect_model(model).layers}
    if arch in WINDOWS:  # the model's window bites and was kept
        assert windows == {None, 5} or windows == {5}
        windowed = "softcap" if arch == "gemma2" else "sliding_window"
        assert sum(n for (_, _, m), n in rt.calls.items() if m == windowed) > 0
    # generation: left padding, prefill then decode steps, same tokens as transformers
    want_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with use(model, prefill="softmax", decode="softmax", plan=FAST) as rt:
        got_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got_tokens, want_tokens)
    assert sum(n for (_, phase, _), n in rt.calls.items() if phase == "decode") > 0


def test_sliding_override_runs_full_attention_in_place_of_the_window() -> None:
    mistral = build("mistral")
    full = build("mistral", sliding_window=None)  # same weights, no window
    ids, mask = padded()
    with torch.no_grad():
        want = full(ids, attention_mask=mask).logits
        windowed = mistral(ids, attention_mask=mask).logits
        with use(mistral, plan={**FAST, "sliding": "override"}):
            got = mistral(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=2e-5)
    assert (windowed[keep] - want[keep]).abs().max() > 1e-3  # the window bites on these prompts


def test_softcap_is_kept_and_a_method_that_cannot_softcap_is_refused() -> None:
    gemma2 = build("gemma2")
    ids, mask = padded()
    match = r"soft-caps attention logits at 50.0.*method 'streaming' cannot"
    with pytest.raises(PlanError, match=match), use(gemma2, prefill="streaming", plan=FAST):
        pass
    with torch.no_grad(), use(gemma2, plan={**FAST, "layers": {1: "streaming"}, "softcap": "drop"}) as rt:
        gemma2(ids, attention_mask=mask)
    assert rt.calls[(1, "prefill", "streaming")] > 0 and rt.calls[(0, "prefill", "softcap")] > 0


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_sliding_layers_keep_both_the_window_and_the_softcap(arch: str) -> None:
    """A window smaller than the prompt and a small cap (both bite on Gemma 2): logits equal transformers'
    eager model; Gemma 2's sliding layer ran softcap with the window, its full layer softcap without; Gemma
    3 (whose attention ignores a configured cap) ran sliding_window and softmax."""
    model = build(arch, attn="eager", sliding_window=4, attn_logit_softcapping=0.5)
    ids, mask = padded(n=14)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        uncapped = 50.0 if arch == "gemma2" else None  # (50: barely bites)
        capped = build(arch, attn="eager", sliding_window=4, attn_logit_softcapping=uncapped)
        capped = capped(ids, attention_mask=mask).logits
        wide = build(arch, attn="eager", sliding_window=64, attn_logit_softcapping=0.5)
        unwindowed = wide(ids, attention_mask=mask)
        with use(model, plan=FAST) as rt:
            got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=2e-5)
    assert (unwindowed.logits[keep] - want[keep]).abs().max() > 1e-3  # the window bites
    parts = {(layer, p.ref) for (layer, phase, *_), ps in rt._parts.items() for p in ps if phase == "prefill"}
    if arch == "gemma2":
        assert (capped[keep] - want[keep]).abs().max() > 1e-3  # the cap bites
        assert parts == {
            (0, attnlab.hf.MethodRef("softcap", (("cap", 0.5), ("window", 4)))),
            (1, attnlab.hf.MethodRef("softcap", (("cap", 0.5),))),
        }
    else:  # Gemma 3's attention never passes its config's cap to the attention function: none, as in transformers
        torch.testing.assert_close(capped[keep], want[keep])
        assert parts == {
            (0, attnlab.hf.MethodRef("sliding_window", (("window", 4),))),
            (1, attnlab.hf.MethodRef("softmax")),
        }
        assert {layer.softcap for layer in attnlab.hf.inspect_model(model).layers} == {None}
    # generation (prefill then decode steps with the sliding cache): the same tokens as eager
    want_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with use(model, plan=FAST):
        got_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got_tokens, want_tokens)


#: parameters that make each registered static / dynamic method compute every causal key of a 12-token
#: prompt (its "full budget"). A method registered later needs an entry here.
DENSE: dict[str, dict[str, Any] | None] = {
    "sliding_window": {"window": 10**6},
    "streaming": {"sinks": 4, "window": 10**6},
    "dilated": {"window": 10**6, "dilation": 1},
    "block_local": {"block": 10**6},
    "block_topk": {"block": 16, "topk": 1000},
    "vertical_slash": {"vertical": 1000, "slash": 1000, "last_q": 4, "block": 16},
    "neighborhood": {"window": 25},
    "strided_heads": {"block": 4, "local": 1000, "vert_stride": 1},
    "power": {"block": 4, "window": 1000},
    "seer": {"block": 16, "topk": 1000},  # one 16-token block holds the 12-token prompt (the local block)
    "radial": {"frame": 1000},
    "doc_blocks": {},
    "multi_axis": None,  # a 2-D (image) pattern: no meaning for a token sequence
    "flexprefill": {"block": 16, "gamma": 1.0, "min_budget": 1000},
    "indexer_topk": {"topk": 10**6},
    "token_sparse": {"min_tokens": 10**6},
    "hip": {"mask_k": 10**6, "block": 16},
    "dhsa": {"budget": 10**6, "block": 16},
    "bilevel_routing": {"regions": 1, "topk": 1},
    "nsa": None,  # gated sum of a compressed-block branch, selection and a window: no budget makes it dense
}


def test_every_sparse_prefill_method_at_full_budget_equals_dense() -> None:
    model = build("llama3")
    ids, mask = padded()
    keep = mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    ran = []
    for name, spec in attnlab.methods().items():
        if spec.family not in ("static", "dynamic"):
            continue
        assert name in DENSE, f"{name}: add its full-budget parameters to DENSE in tests/test_hf_models.py"
        params = DENSE[name]
        if params is None:
            continue
        with torch.no_grad(), use(model, prefill=name, prefill_params=params, plan=FAST) as rt:
            got = model(ids, attention_mask=mask).logits
        err = (got[keep] - want[keep]).abs().max().item()
        assert err < 2e-5 * (1 + want[keep].abs().max().item()), f"{name} at full budget: max error {err}"
        assert rt.calls[(0, "prefill", name)] > 0
        ran.append(name)
    assert {"sliding_window", "streaming", "block_topk", "vertical_slash"} <= set(ran)
