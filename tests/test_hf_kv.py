"""attnlab.hf KV memory: ``use(..., free_kv=True)`` removes what snapkv / h2o evict from transformers'
DynamicCache (same greedy tokens and logits as the masking path at the same budget, on config-built
Llama-3 (GQA 4:1) and Qwen2 (7:1), left-padded batches included; the cache tensors shrink), and
``kv_memory`` reports allocated vs kept vs read bytes per layer for every kind of decode method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnlab  # noqa: E402
from attnlab.hf import HFRuntimeError, kv_memory, use  # noqa: E402
from attnlab.hf.testing import build, fast_plan, padded  # noqa: E402
from attnlab.registry import registered  # noqa: E402

FAST = fast_plan()
NEW = 5  # new tokens: the prefill, then 4 decode steps (the first one decides and compacts)


@contextlib.contextmanager
def decode_methods() -> Iterator[None]:
    from attnlab.catalog.decode import SPECS

    with contextlib.ExitStack() as stack:
        for spec in SPECS:
            if spec.name not in attnlab.methods():
                stack.enter_context(registered(spec))
        yield


def generate(
    model: Any, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int = NEW, **kw: Any
) -> Any:
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kw,
    )  # fmt: skip


def layer_lengths(cache: Any) -> list[int]:
    return [int(layer.keys.shape[2]) for layer in cache.layers]


CASES = [
    # (arch, method, params, pads): budget 8 < every row's 13 / 10 tokens at the first decode step (no
    # padding after compaction); budget 11 >= row 1's 10 real tokens (row 1 keeps all, left-padded by 1)
    ("llama3", "snapkv", {"budget": 8, "window": 4, "kernel": 3}, (0, 3)),
    ("llama3", "h2o", {"budget": 11, "recent": 2}, (0, 3)),
    ("qwen2", "snapkv", {"budget": 11, "window": 4, "kernel": 3}, (0, 3)),
    ("qwen2", "h2o", {"budget": 8}, (0, 0)),
]


@pytest.mark.parametrize(("arch", "method", "params", "pads"), CASES)
def test_freeing_gives_the_masking_paths_tokens_and_shrinks_the_cache(
    arch: str, method: str, params: dict[str, Any], pads: tuple[int, ...]
) -> None:
    model = build(arch)
    ids, mask = padded(batch=2, pads=pads)
    n = ids.shape[1]
    with decode_methods():
        with use(model, decode=method, decode_params=params, plan=FAST) as rt_mask:
            masked = generate(model, ids, mask)
            mem_masked = kv_memory(masked.past_key_values, rt_mask)
        with use(model, decode=method, decode_params=params, plan=FAST, free_kv=True) as rt:
            freed = generate(model, ids, mask)
            mem_freed = kv_memory(freed.past_key_values, rt)
    assert torch.equal(freed.sequences, masked.sequences)
    for a, b in zip(freed.logits, masked.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the masking path keeps every token; freeing keeps, per row, min(budget, real tokens at the decision)
    total = n + NEW - 1
    assert layer_lengths(masked.past_key_values) == [total] * 2
    real = [n + 1 - p for p in pads]  # tokens of each row when the first decode step decides
    kept = [min(params["budget"], r) for r in real]
    assert layer_lengths(freed.past_key_values) == [max(kept) + NEW - 2] * 2
    assert freed.past_key_values.get_seq_length() == total  # the logical length transformers counts
    # the compaction: per row the physical start of its real keys (left padding when rows keep fewer)
    for layer in (0, 1):
        rec = rt.compacted[layer]
        assert rec.kept == tuple(kept) and rec.shift == n + 1 - max(kept)
        assert rec.starts == (None if len(set(kept)) == 1 else tuple(max(kept) - c for c in kept))
    # memory: what the masking path keeps is what the freed cache holds (plus its padding slots)
    for m, f in zip(mem_masked, mem_freed, strict=True):
        assert m.method == f.method == method and not m.freed and f.freed
        assert m.kept == f.kept < m.allocated
        per_token = f.allocated // (2 * freed.past_key_values.layers[0].keys.shape[1] * f.tokens)
        pad_slots = sum(max(kept) - c for c in kept) * freed.past_key_values.layers[0].keys.shape[1]
        assert f.allocated - f.kept == pad_slots * per_token
        assert m.masked > 0


def test_a_new_prefill_after_compaction_starts_over() -> None:
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    params = {"budget": 8, "recent": 2}
    with decode_methods():
        with use(model, decode="h2o", decode_params=params, plan=FAST) as rt:
            want_one = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
        with use(model, decode="h2o", decode_params=params, plan=FAST, free_kv=True) as rt:
            generate(model, ids, mask)
            assert set(rt.compacted) == {0, 1}
            got_one = model.generate(ids[:1], max_new_tokens=3, do_sample=False)  # new cache, new prefill
            assert torch.equal(got_one, want_one)
            assert {k[2] for k in rt.states} == {None}  # the old per-row states are gone


def test_kv_memory_reports_every_kind_of_decode_method() -> None:
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    n = ids.shape[1] + NEW - 1
    real = [n, n - 3]
    h_kv = model.config.num_key_value_heads
    with torch.no_grad():
        plain = generate(model, ids, mask)
    (layer0, *_) = kv_memory(plain.past_key_values)  # no runtime: every token counts as kept
    assert layer0.method == "softmax" and layer0.kept == layer0.allocated == layer0.read
    keys = plain.past_key_values.layers[0].keys
    per_token = 2 * keys.shape[3] * keys.element_size()
    assert layer0.allocated == 2 * keys.numel() * keys.element_size() == 2 * h_kv * n * per_token
    with decode_methods():
        with use(model, decode="retrieval_heads_kv", decode_params={"heads": (0,), "budget": 6, "sink": 2},
                 plan=FAST) as rt:  # fmt: skip
            mem = kv_memory(generate(model, ids, mask).past_key_values, rt)
        # KV head 0 keeps every real token, head 1 its sink + window of 6
        want = sum(r + min(6, r) for r in real) * per_token
        assert [(m.method, m.kept, m.read, m.freed) for m in mem] == [
            ("retrieval_heads_kv", want, want, False)
        ] * 2
        with use(model, decode="page_topk", decode_params={"budget": 8, "page": 4}, plan=FAST) as rt:
            mem = kv_memory(generate(model, ids, mask).past_key_values, rt)
        # a selection method keeps the cache (it may pick any token later) and reads its budget per step
        kept, read = sum(real) * h_kv * per_token, sum(min(8, r) for r in real) * h_kv * per_token
        assert [(m.kept, m.read) for m in mem] == [(kept, read)] * 2
        assert all(m.masked == (2 * n - sum(real)) * h_kv * per_token for m in mem)  # the padding


def test_free_kv_refuses_what_it_cannot_compact() -> None:
    model = build("llama3")
    ids, _ = padded(batch=1)
    with pytest.raises(TypeError, match="free_kv must be True or False, got 1"), use(model, free_kv=1):  # type: ignore[arg-type]
        pass
    static = "free_kv compacts transformers' full-attention DynamicLayer"
    with (
        decode_methods(),
        use(model, decode="snapkv", decode_params={"budget": 4, "window": 2}, plan=FAST, free_kv=True),
        pytest.raises(HFRuntimeError, match=static),
    ):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    with pytest.raises(TypeError, match="kv_memory takes a transformers Cache"):
        kv_memory(object())


@pytest.mark.parametrize(
    ("method", "params", "keep"),
    [
        ("retrieval_heads_kv", {"heads": (), "budget": 6, "sink": 2}, 6),
        ("streaming", {"sinks": 2, "window": 5}, 7),
        ("retrieval_heads_kv", {"heads": (0,), "budget": 6, "sink": 2}, None),  # a retrieval head: no freeing
    ],
)
def test_sink_and_window_methods_drop_their_middle(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any], keep: int | None
) -> None:
    """Freed whenever a row outgrows sinks + window + SLACK (SLACK 1 here): same tokens and logits as the
    masking path; after each step the cache holds at most sinks + window + SLACK tokens per row."""
    import sys

    monkeypatch.setattr(sys.modules["attnlab.hf.use"], "SLACK", 1)  # (attnlab.hf.use is the function)
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    new = 8
    with decode_methods():
        with use(model, decode=method, decode_params=params, plan=FAST):
            masked = generate(model, ids, mask, max_new_tokens=new)
        with use(model, decode=method, decode_params=params, plan=FAST, free_kv=True) as rt:
            freed = generate(model, ids, mask, max_new_tokens=new)
            mem = kv_memory(freed.past_key_values, rt)
    assert torch.equal(freed.sequences, masked.sequences)
    for a, b in zip(freed.logits, masked.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    total = ids.shape[1] + new - 1
    lengths = layer_lengths(freed.past_key_values)
    assert freed.past_key_values.get_seq_length() == total
    if keep is None:
        assert lengths == [total] * 2 and not rt.compacted
    else:
        assert all(keep <= n <= keep + 1 for n in lengths) and set(rt.compacted) == {0, 1}
        assert all(m.freed and m.kept == m.allocated for m in mem)  # both rows outgrew the window


#: small budgets (the 12-token prompts hold 12..16 tokens while decoding)
SMALL: dict[str, dict[str, Any]] = {
    "page_topk": {"budget": 8, "page": 4},
    "retrieval_heads_kv": {"heads": (1,), "budget": 6, "sink": 2},
    "snapkv": {"budget": 8, "window": 4, "kernel": 3},
    "h2o": {"budget": 8, "recent": 2},
    "recycled": {"budget": 8, "stride": 2, "pool": 3},
    "tokenselect": {"budget": 8, "n_init": 2, "n_local": 2},
    "tidal": {"budget": 8},
}


def test_kv_memory_of_every_decode_method() -> None:
    """Per decode method of attnlab.catalog.decode, masking (free_kv off): the cache allocates every token;
    eviction keeps its budget, sink + window heads their budget, selection methods keep every real token and
    read their budget; padding is allocated, never kept."""
    from attnlab.catalog.decode import SPECS

    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    n = ids.shape[1] + NEW - 1
    real = [n, n - 3]
    h_kv = model.config.num_key_value_heads
    with decode_methods():
        assert {s.name for s in SPECS} == set(SMALL), "add the new decode method to SMALL"
        for name, params in SMALL.items():
            layers = (
                {0: {"decode": {"method": "tidal", "params": {"role": "select"}}}} if name == "tidal" else {}
            )
            with use(model, decode=name, decode_params=params, plan={**FAST, "layers": layers}) as rt:
                cache = generate(model, ids, mask).past_key_values
                mem = kv_memory(cache, rt)
            keys = cache.layers[0].keys
            per_token = 2 * keys.shape[3] * keys.element_size()
            budget = params["budget"]
            if name in ("snapkv", "h2o"):  # decided at the first decode step (real + 1 - 4 tokens then)
                kept = [min(budget, r - NEW + 2) + NEW - 2 for r in real]
                want_kept = want_read = sum(kept) * h_kv
            elif name == "retrieval_heads_kv":  # KV head 1 keeps everything, head 0 sinks + window
                want_kept = want_read = sum(r + min(budget, r) for r in real)
            else:
                want_kept, want_read = sum(real) * h_kv, sum(min(budget, r) for r in real) * h_kv
            for m in mem:
                assert m.method == name and m.tokens == n and not m.freed, (name, m)
                assert m.allocated == 2 * h_kv * n * per_token, name
                read = (
                    want_kept if name == "tidal" and m.layer == 0 else want_read
                )  # layer 0 selects: reads all
                assert (m.kept, m.read) == (want_kept * per_token, read * per_token), (name, m)


@pytest.mark.parametrize("pads", [(0, 5), (0, 95)], ids=["rows-keep-alike", "a-short-row-left-padded"])
def test_beam_search_with_free_kv_and_a_stateless_method(pads: tuple[int, ...]) -> None:
    """Beam search runs under ``free_kv`` with a stateless sink + window method (no per-row decode state
    to reorder): the beams of one prompt keep the same tokens, so the compaction's per-row padding follows
    transformers' row reordering, and the beams' tokens equal the masking path's; (0, 95): one row holds
    fewer real tokens than sinks + window, and is left-padded in the compacted cache."""
    model = build("llama3")
    ids, mask = padded(batch=2, n=100, pads=pads)
    params = {"sinks": 4, "window": 8}
    outs = {}
    for free in (False, True):
        with use(model, decode="streaming", decode_params=params, plan=FAST, free_kv=free) as rt:
            outs[free] = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2,
                return_dict_in_generate=True,
            )  # fmt: skip
            if free:
                real = [100 + 1 - p for p in pads]  # (at the first decode step, which compacts)
                kept = tuple(min(12, r) for r in real for _ in range(2))  # (two beams per prompt)
                assert {layer: rec.kept for layer, rec in rt.compacted.items()} == {0: kept, 1: kept}
    assert torch.equal(outs[True].sequences, outs[False].sequences)
