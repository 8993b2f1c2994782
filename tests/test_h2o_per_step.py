"""h2o with ``per_step=True`` (the H2O paper's decoding loop): a plain per-head loop over the steps written
from the paper / the authors' code as the oracle, the reference and both backends against it, padding, the
exact case, bad input; under attnlab.hf on config-built Llama-3 (GQA) and Qwen2 models: masking vs
free_kv, the cache held at the budget, and full budget = dense greedy decoding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.decode import h2o
from attnlab.errors import InputError
from attnlab.hf.use import model_cache
from attnlab.registry import registered
from attnlab.state import EvictionState, StepEvictionState
from attnlab.testing import device_under_test

DEVICE = device_under_test()
SCALE = 0.25


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with registered(h2o.SPEC) if "h2o" not in attnlab.methods() else contextlib.nullcontext():
        yield


def _qkv(b: int, h: int, h_kv: int, n: int, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=g).to(DEVICE) for x in (h, h_kv, h_kv)]


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> attnlab.Result:
    res = attnlab.attention(q, k, v, method="h2o", causal=True, **kw)
    assert isinstance(res, attnlab.Result)
    return res


def oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n0: int, budget: int, recent: int, normalize: bool
) -> tuple[list[torch.Tensor], list[list[list[list[int]]]]]:
    """Per-step H2O as a plain loop: prefill of n0 queries, then one query per step. Per (batch, KV head):
    a dict token -> [accumulated attention, queries that saw it]; each call attends (softmax over the
    cached tokens it may see) to the cache, adds the weights (mean over the group's query heads), then keeps
    the recent tokens and the best of the rest. Returns the outputs per call and the kept lists."""
    b, h, n, _ = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    cache: list[list[dict[int, list[float]]]] = [[{} for _ in range(h_kv)] for _ in range(b)]
    outs, kept = [], []
    for end in range(n0, n + 1):
        first = end - (n0 if end == n0 else 1)
        out = torch.zeros(b, h, end - first, v.shape[3], dtype=torch.float64)
        for bi in range(b):
            for j in range(h_kv):
                c = cache[bi][j]
                for t in range(first, end):
                    c.setdefault(t, [0.0, 0.0])
                toks = sorted(c)
                for i, pos in enumerate(range(first, end)):
                    vis = [t for t in toks if t <= pos]
                    for t in vis:
                        c[t][1] += 1
                    for hh in range(j * g, (j + 1) * g):
                        logits = torch.stack([(q[bi, hh, pos].double() @ k[bi, j, t].double()) for t in vis])
                        w = torch.softmax(logits * SCALE, 0)
                        out[bi, hh, i] = w @ v[bi, j, vis].double()
                        for t, wt in zip(vis, w.tolist(), strict=True):
                            c[t][0] += wt / g
                if len(toks) > budget:
                    rest = toks[: len(toks) - recent] if recent else toks
                    rank = {t: c[t][0] / c[t][1] if normalize else c[t][0] for t in rest}
                    heavy = sorted(rest, key=lambda t: -rank[t])[: budget - recent]
                    keep = set(heavy) | set(toks[len(toks) - recent :])
                    cache[bi][j] = {t: c[t] for t in sorted(keep)}
        outs.append(out)
        kept.append([[sorted(cache[bi][j]) for j in range(h_kv)] for bi in range(b)])
    return outs, kept


@pytest.mark.parametrize(
    ("backend", "params"),
    [
        ("reference", {"budget": 9, "recent": 3, "normalize": False}),
        ("torch", {"budget": 9, "recent": 3, "normalize": False}),
        ("torch", {"budget": 7}),
        ("triton", {"budget": 8, "recent": 4}),
        ("torch", {"budget": 18, "recent": 2}),  # nothing evicted until the cache outgrows 18 tokens
    ],
)
def test_steps_follow_the_plain_loop(backend: str, params: dict[str, Any]) -> None:
    q, k, v = _qkv(2, 4, 2, 24)
    n0 = 16
    want_out, want_kept = oracle(
        q, k, v, n0, params["budget"], params.get("recent", 0), params.get("normalize", True)
    )
    state = None
    for i, end in enumerate(range(n0, 25)):
        first = end - (n0 if end == n0 else 1)
        res = attnlab.attention(q[:, :, first:end], k[:, :, :end], v[:, :, :end], method="h2o", causal=True,
                                scale=SCALE, backend=backend, state=state, per_step=True, **params)  # fmt: skip
        assert isinstance(res, attnlab.Result) and isinstance(res.state, StepEvictionState)
        torch.testing.assert_close(res.out.double().cpu(), want_out[i], atol=2e-5, rtol=2e-5)
        assert res.state.kept.tolist() == want_kept[i]
        assert res.state.length == end and res.state.kept.shape[2] == min(params["budget"], end)
        state = res.state


def test_budget_covering_the_sequence_is_exact_and_padding_is_never_kept() -> None:
    q, k, v = _qkv(2, 4, 2, 20, seed=3)
    mask = torch.ones(2, 20, device=DEVICE)
    mask[1, :5] = 0  # row 1: 5 padding tokens first
    states: dict[str, Any] = {"torch": None, "reference": None}
    for end in range(14, 21):
        first = end - (14 if end == 14 else 1)
        qs, ks, vs, km = q[:, :, first:end], k[:, :, :end], v[:, :, :end], mask[:, :end]
        for backend in states:
            full = _run(
                qs, ks, vs, backend=backend, budget=32, per_step=True, state=states[backend], key_mask=km
            )
            dense = _run(qs, ks, vs, backend="reference", budget=32, key_mask=km).out
            torch.testing.assert_close(full.out, dense, atol=1e-5, rtol=1e-5)
            states[backend] = full.state
    st = states["torch"]
    assert st.complete() and st.kept.shape[2] == 20
    assert (st.score[1, :, :5] == 0).all() and (st.seen[1, :, :5] == 0).all()  # padding got no attention
    # a budget below the real tokens: row 1's padding is dropped first, every kept token of row 1 is real
    small = _run(q[:, :, 19:], k, v, budget=10, per_step=True, key_mask=mask)
    assert (small.state.kept[1] >= 5).all()


def test_bad_input() -> None:
    q, k, v = _qkv(1, 4, 2, 12)
    once = _run(q, k, v, budget=4).state
    assert isinstance(once, EvictionState)
    with pytest.raises(InputError, match="per_step=True.*got EvictionState"):
        attnlab.attention(q[:, :, -1:], k, v, method="h2o", causal=True, budget=4, per_step=True, state=once)
    step = _run(q, k, v, budget=4, per_step=True).state
    with pytest.raises(InputError, match="12-token cache but the cache holds 10"):
        attnlab.attention(q[:, :, -1:], k[:, :, :10], v[:, :, :10], method="h2o", causal=True, budget=4,
                          per_step=True, state=step)  # fmt: skip
    with pytest.raises(Exception, match="per_step"):
        attnlab.attention(q, k, v, method="h2o", causal=True, budget=4, per_step="yes")


# -- attnlab.hf --------------------------------------------------------------------------------------------

pytest.importorskip("transformers")

from attnlab.hf import kv_memory, use  # noqa: E402
from attnlab.hf.testing import build, fast_plan, padded  # noqa: E402

FAST = fast_plan()


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, new: int) -> Any:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip


@pytest.mark.parametrize(("arch", "pads", "budget"), [("llama3", (0, 3), 8), ("qwen2", (0, 5), 9)])
def test_hf_free_kv_evicts_every_step_and_matches_masking(
    arch: str, pads: tuple[int, ...], budget: int
) -> None:
    model = build(arch)
    ids, mask = padded(batch=2, pads=pads)
    n, new = ids.shape[1], 6
    params = {"budget": budget, "recent": 3, "per_step": True}
    lengths: list[list[int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:  # after the last layer
        lengths.append([int(layer.keys.shape[2]) for layer in model_cache(kwargs).layers])

    with use(model, decode="h2o", decode_params=params, plan=FAST) as rt:
        masked = _generate(model, ids, mask, new)
    with use(model, decode="h2o", decode_params=params, plan=FAST, free_kv=True) as rt:
        attn = model.model.layers[1].self_attn
        hook = attn.register_forward_hook(record, with_kwargs=True)
        try:
            freed = _generate(model, ids, mask, new)
        finally:
            hook.remove()
        mem = kv_memory(freed.past_key_values, rt)
    assert torch.equal(freed.sequences, masked.sequences)
    for a, b in zip(freed.logits, masked.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # after each decode step every layer holds the budget (+ padding slots of a row with fewer real tokens)
    real = [n - p for p in pads]
    for step, lens in enumerate(lengths[1:], start=1):  # lengths[0]: after the prefill
        want = max(min(budget, r + step) for r in real)
        assert lens == [want, want], (step, lens)
    assert lengths[-1] == [budget, budget]
    assert freed.past_key_values.get_seq_length() == n + new - 1  # logical length
    assert all(m.kept == m.allocated and m.freed for m in mem)  # both rows at the budget: no padding left
    # the masking path keeps every token, attends to the budget
    assert [int(layer.keys.shape[2]) for layer in masked.past_key_values.layers] == [n + new - 1] * 2


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_hf_full_budget_equals_dense_greedy(arch: str) -> None:
    model = build(arch)
    ids, mask = padded(batch=2, pads=(0, 4))
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for free in (False, True):
        with use(
            model, decode="h2o", decode_params={"budget": 64, "per_step": True}, plan=FAST, free_kv=free
        ):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, dense), free
