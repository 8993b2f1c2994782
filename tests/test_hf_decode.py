"""attnlab.hf decode: routing to the decode method, per-layer state kept in the use() context and reset
at a new prefill, padded batches in decode, and every decode method of attnlab.catalog.decode inside
generation (full budget: the same tokens as dense greedy decoding)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

import attnlab  # noqa: E402
from attnlab.backends.eager import EAGER  # noqa: E402
from attnlab.core import MethodSpec  # noqa: E402
from attnlab.hf import PlanError, use  # noqa: E402
from attnlab.hf.testing import build, fast_plan, padded  # noqa: E402
from attnlab.params import Params  # noqa: E402
from attnlab.registry import registered  # noqa: E402

FAST = fast_plan()


@dataclass(frozen=True)
class _StepsParams(Params):
    """No parameters."""

    method = "test_decode_steps"


def _steps_reference(
    q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
    state: dict[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Any]]:  # fmt: skip
    """Exact causal attention; the state counts the calls and records the cache lengths seen."""
    out = attnlab.attention(q, k, v, method="softmax", causal=True, scale=scale, backend="reference")
    old = state or {"calls": 0, "lengths": []}
    return out, {"calls": old["calls"] + 1, "lengths": [*old["lengths"], k.shape[2]], "batch": q.shape[0]}


STEPS = MethodSpec(
    name="test_decode_steps",
    family="decode",
    paper="(test)",
    summary="a stateful test decode method",
    param_class=_StepsParams,
    reference=_steps_reference,  # type: ignore[arg-type]
    backends=(EAGER,),
    patterns=frozenset({attnlab.Pattern.CAUSAL_CROSS, attnlab.Pattern.CAUSAL_SELF}),
    test_params=({},),
    bench_params=lambda n: [{}],
    stateful=True,
)


def test_decode_calls_carry_a_per_layer_state_reset_at_a_new_prefill() -> None:
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with registered(STEPS):
        match = r"'test_decode_steps' cannot run in prefill: it is a decode-only"
        with pytest.raises(PlanError, match=match), use(model, prefill="test_decode_steps"):
            pass
        with use(model, decode="test_decode_steps", plan=FAST) as rt:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, want)
            # left padding: each sequence runs on its own keys, so each keeps its own state per layer
            assert set(rt.states) == {(layer, 0, (row,)) for layer in (0, 1) for row in (0, 1)}
            for (_, _, (row,)), state in rt.states.items():
                pad = 3 * row
                assert state["calls"] == 3 and state["batch"] == 1  # 4 new tokens: 3 decode steps
                assert state["lengths"] == [13 - pad, 14 - pad, 15 - pad]
            assert rt.calls[(0, "decode", "test_decode_steps")] == 3 * 2
            model.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)  # a new prefill
            assert set(rt.states) == {(0, 0, None), (1, 0, None)}
            assert all(s["calls"] == 2 and s["lengths"] == [13, 14] for s in rt.states.values())


@contextlib.contextmanager
def decode_methods() -> Iterator[list[str]]:
    """The decode methods of attnlab.catalog.decode, registered for the block where they are not yet."""
    from attnlab.catalog.decode import SPECS

    with contextlib.ExitStack() as stack:
        for spec in SPECS:
            if spec.name not in attnlab.methods():
                stack.enter_context(registered(spec))
        yield [spec.name for spec in SPECS]


#: small-budget parameters (the 12-token prompts below have 12..15 cached keys)
SMALL: dict[str, dict[str, Any]] = {
    "page_topk": {"budget": 8, "page": 4},
    "retrieval_heads_kv": {"heads": (0,), "budget": 6, "sink": 2},
    "snapkv": {"budget": 8, "window": 4, "kernel": 3},
    "h2o": {"budget": 8, "recent": 2},
    "recycled": {"budget": 8, "stride": 2, "pool": 3},
    "tokenselect": {"budget": 8, "n_init": 2, "n_local": 2},
    "tidal": {"budget": 8},
}


def test_every_decode_method_in_generation() -> None:
    """Full budget: the same tokens as dense greedy decoding (on a left-padded batch); small budget (fewer
    tokens than the cache holds): generation runs through the method at every decode step of every layer."""
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with decode_methods() as names:
        assert set(SMALL) == set(names), "add the new decode method's small-budget parameters to SMALL"
        for name in names:
            small = SMALL[name]
            # tidal: layer 0 selects, layer 1 reuses its positions
            layers = (
                {0: {"decode": {"method": "tidal", "params": {"role": "select"}}}} if name == "tidal" else {}
            )
            full = {**small, "budget": 10**6}
            with use(model, decode=name, decode_params=full, plan={**FAST, "layers": layers}) as rt:
                got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, want), name
            assert rt.calls[(1, "decode", name)] == 3 * 2, name
            with use(model, decode=name, decode_params=small, plan={**FAST, "layers": layers}) as rt:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert out.shape == want.shape and rt.calls[(1, "decode", name)] == 3 * 2, name


def test_tidal_passes_positions_from_layer_to_layer() -> None:
    model = build("llama3", layers=3)
    ids, _ = padded(batch=1)
    with decode_methods():
        tidal = lambda role: {"decode": {"method": "tidal", "params": {"role": role, "budget": 5}}}
        plan = {**FAST, "layers": {0: tidal("full"), 1: tidal("select"), 2: tidal("reuse")}}
        with use(model, plan=plan) as rt:
            model.generate(ids, max_new_tokens=3, do_sample=False)
        # one state for the sequence, shared by the layers (not one per layer)
        assert list(rt.states) == [("tidal", None, None)]
        assert rt.calls[(2, "decode", "tidal")] == 2


def test_bound_decode_step_equals_the_op_call_and_resolves_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """attnlab.hf's bound decode step (the op's call resolved once, then only N_k updated) gives the same
    tokens and logits as calling the prepared op every step, and validates once per layer and batch-row
    group instead of once per step; a new signature (another batch) is resolved again."""
    from attnlab.api import Op

    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    resolves: list[int] = []
    real = Op.resolve

    def counting(self: Op, q: Tensor, k: Tensor, v: Tensor) -> Any:
        if self.spec.name == "page_topk":
            resolves.append(k.shape[2])
        return real(self, q, k, v)

    monkeypatch.setattr(Op, "resolve", counting)
    outs = {}
    with decode_methods():
        for bind in (False, True):
            resolves.clear()
            with use(model, decode="page_topk", decode_params=SMALL["page_topk"], plan=FAST) as rt:
                rt.bind_decode = bind
                outs[bind] = model.generate(
                    ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                    return_dict_in_generate=True,
                )  # fmt: skip
                assert rt.calls[(1, "decode", "page_topk")] == 4 * 2  # 4 decode steps, 2 padded rows
            # bound: one resolve per layer and row group; unbound: the op itself grows N_k without
            # resolving again (Op._grown), so one per layer (rows of equal length share its entries)
            if bind:
                assert len(resolves) == 2 * 2, resolves
            else:
                assert len(resolves) == 2 and len(set(resolves)) == 1, resolves
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    for a, b in zip(outs[True].logits, outs[False].logits, strict=True):
        assert torch.equal(a, b)


def test_bound_decode_step_revalidates_a_new_signature() -> None:
    """The bound step keys on every shape but N_k: a batch of another size, or another dtype, is resolved
    (and validated) again rather than reusing the earlier call."""
    from attnlab.hf.interface import Runtime

    model = build("llama3")
    with decode_methods(), use(model, decode="page_topk", decode_params=SMALL["page_topk"], plan=FAST) as rt:
        assert isinstance(rt, Runtime)
        model.generate(ids_of(1), max_new_tokens=3, do_sample=False)
        sigs = {id(p): b.sig for parts in rt._parts.values() for p in parts for b in p._bound.values()}
        assert sigs and all(s[0][0][0] == 1 for s in sigs.values())  # q (B=1, ...)
        model.generate(ids_of(2), max_new_tokens=3, do_sample=False)
        sigs = {id(p): b.sig for parts in rt._parts.values() for p in parts for b in p._bound.values()}
        assert all(s[0][0][0] == 2 for s in sigs.values())
        for parts in rt._parts.values():
            for p in parts:
                for b in p._bound.values():
                    assert b.call.problem.batch == 2 and b.call.problem.n_k == 14  # 12 + 3 - 1


def ids_of(batch: int) -> Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, 128, (batch, 12), generator=g)


def test_static_cache_runs_and_matches_the_dynamic_cache() -> None:
    """generate(cache_implementation="static") (a StaticCache: keys padded to the maximum length, the mask
    made once by generate) runs every decode step through the method on the visible keys only: at full
    budget the dense tokens, at a small budget the same tokens as with the dynamic cache."""
    model = build("llama3")
    ids, mask = padded(batch=2, pads=(0, 3))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    small = SMALL["page_topk"]
    with decode_methods():
        with use(model, plan=FAST) as rt:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 cache_implementation="static")  # fmt: skip
        assert torch.equal(got, want) and rt.calls[(1, "decode", "softmax")] == 3 * 2
        with use(model, decode="page_topk", decode_params={**small, "budget": 10**6}, plan=FAST):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 cache_implementation="static")  # fmt: skip
        assert torch.equal(got, want)
        outs = []
        for cache in ("dynamic", "static"):
            with use(model, decode="page_topk", decode_params=small, plan=FAST) as rt:
                outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                           cache_implementation=cache))  # fmt: skip
            assert rt.calls[(1, "decode", "page_topk")] == 4 * 2
        assert torch.equal(outs[0], outs[1])


def test_beam_search_is_refused_with_a_stateful_decode_method() -> None:
    """Beam search reorders the cache's rows between steps; a stateful decode method's state would not
    follow, so generate refuses it inside use() (num_beams as a keyword or in a GenerationConfig), and
    generate is the model's own again after the block."""
    model = build("llama3")
    ids = ids_of(1)
    with decode_methods():
        with use(model, decode="page_topk", decode_params=SMALL["page_topk"], plan=FAST):
            with pytest.raises(attnlab.hf.HFRuntimeError, match=r"num_beams=2.*page_topk.*beam search"):
                model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
            cfg = transformers.GenerationConfig(num_beams=3, max_new_tokens=3, do_sample=False)
            with pytest.raises(attnlab.hf.HFRuntimeError, match=r"num_beams=3"):
                model.generate(ids, generation_config=cfg)
            model.generate(ids, max_new_tokens=2, do_sample=False)  # greedy still runs
        assert "generate" not in vars(model)
        with use(model, plan=FAST):  # no stateful method: beams run
            out = model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)
        assert out.shape == (1, 14)


def test_review_s18_packed_sequences_are_refused_not_attended_across() -> None:
    """position_ids restarting inside a row (transformers' packed sequences) ask for a mask other than causal:
    refused, instead of attending across the packed sequences; a plain prompt still runs."""
    from attnlab.hf import HFRuntimeError
    from attnlab.hf.testing import ids

    m = build("llama3")
    x = ids(batch=1, n=12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad(), use(m, plan=FAST):
        with pytest.raises(HFRuntimeError, match="packed sequences"):
            m(x, position_ids=pos, use_cache=False)
        m(x, use_cache=False)


def test_review_s18_generate_from_a_cached_prefix_starts_fresh_decode_state() -> None:
    """A generate that continues a cached prefix (no prefill call) after another generation in the same use
    gives what it gives alone: the decode state starts fresh at every generate."""
    import copy

    from transformers import DynamicCache

    from attnlab.hf.testing import ids

    m = build("llama3")
    a, b = ids(1, 12, seed=1), ids(1, 24, seed=2)
    with torch.no_grad():
        prefix = DynamicCache()
        m(b[:, :20], past_key_values=prefix)
    outs = []
    for warm in (False, True):
        with use(m, decode="snapkv", decode_params={"budget": 8, "window": 2}, plan=FAST):
            if warm:
                m.generate(a, max_new_tokens=5, do_sample=False)
            outs.append(m.generate(b, past_key_values=copy.deepcopy(prefix), max_new_tokens=5, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True))  # fmt: skip
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for x, y in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(x, y)


def test_review_s18_tidal_without_a_select_layer_is_refused() -> None:
    m = build("llama3", layers=3)
    with pytest.raises(PlanError, match="no layer with role 'select'"), use(m, decode="tidal", plan=FAST):
        pass
    plan = {**FAST, "layers": {0: {"decode": {"method": "tidal", "params": {"role": "select", "budget": 4}}}}}
    with use(m, decode="tidal", decode_params={"budget": 4}, plan=plan):
        pass


def test_review_s18_a_registered_plan_is_checked_against_every_model() -> None:
    """One registered runtime serving two models checks the plan against each (head 7 exists in the first
    model only)."""
    from attnlab.hf import register, unregister
    from attnlab.hf.testing import ids

    register(plan={**FAST, "heads": {0: {7: {"method": "streaming", "params": {"window": 2}}}}})
    try:
        a = build("llama3", attn="attnlab")
        b = build("llama3", attn="attnlab", heads=4, kv_heads=1)
        x = ids(batch=1, n=8)
        with torch.no_grad():
            a(x)
            with pytest.raises(PlanError, match="names query head 7"):
                b(x)
    finally:
        unregister()


def test_review_s18_a_method_in_place_of_a_window_needs_a_cache_that_keeps_every_token() -> None:
    """On a sliding layer whose cache keeps the model's window only, a method the plan runs in place of the
    window is refused (it would see the window's keys alone); with a full DynamicCache it runs and, as
    softmax with "sliding": "override", gives the model without a window."""
    from transformers import DynamicCache

    from attnlab.hf import HFRuntimeError
    from attnlab.hf.testing import ids

    windowed = build("mistral", sliding_window=5)
    full = build("mistral", sliding_window=None)
    x = ids(1, 12)
    want = full.generate(x, max_new_tokens=6, do_sample=False)
    plan = {**FAST, "sliding": "override"}
    with use(windowed, plan=plan):
        with pytest.raises(HFRuntimeError, match="keeps only the model's sliding window of 5"):
            windowed.generate(x, max_new_tokens=6, do_sample=False)
        got = windowed.generate(x, max_new_tokens=6, do_sample=False, past_key_values=DynamicCache())
    assert torch.equal(got, want)
    with use(windowed, plan=FAST):  # the model's own window: runs on its window cache
        kept = windowed.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(kept, windowed.generate(x, max_new_tokens=6, do_sample=False))
