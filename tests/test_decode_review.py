"""Decode methods, review fixes: tokenselect never reuses an exact-fallback selection, recycled's reference
masks padding on partial steps, snapkv refuses a budget below its window, a TokenSet belongs to the method
that made it, and the decode-only selections refuse more queries than they can serve (registered for the
test only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog import decode
from attnlab.catalog.decode import retrieval_heads_kv, snapkv, tidal, tokenselect
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.registry import registered
from attnlab.state import TokenSet
from attnlab.testing import device_under_test

DEVICE = device_under_test()
BACKENDS = ("torch", "triton", "reference")


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for spec in decode.SPECS:
            stack.enter_context(registered(spec))
        yield


def _qkv(b: int, h: int, h_kv: int, n_q: int, n_k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, n, 16, generator=g).to(DEVICE) for x, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))]


def _run(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Result:
    res = attnlab.attention(q, k, v, method=method, causal=True, **kw)
    assert isinstance(res, Result)
    return res


# -- 1. tokenselect: a selection made under the exact fallback is never reused ------------------------------
TS = {"budget": 20, "n_init": 2, "n_local": 4, "threshold": 0.9}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokenselect_growing_past_the_budget_votes_anew(backend: str) -> None:
    """A cache that grows past the budget with similar queries: every step equals a fresh-state call until
    a real vote exists (the exact steps' empty selections are not reused), then the vote is reused."""
    q0, k, v = _qkv(1, 4, 2, 1, 40)
    g = torch.Generator().manual_seed(1)
    state = None
    for n in (19, 20, 30, 31):  # exact, exact, the first call past the budget, a reuse
        q = q0 + 0.01 * torch.randn(q0.shape, generator=g).to(DEVICE)
        kv = k[:, :, :n], v[:, :, :n]
        res = _run("tokenselect", q, *kv, backend=backend, state=state, **TS)
        fresh = _run("tokenselect", q, *kv, backend=backend, **TS)
        assert isinstance(res.state, TokenSet)
        if n <= 30:  # (before the fix: at 30 the empty selection was reused, 6 tokens attended, off by ~1)
            torch.testing.assert_close(res.out, fresh.out, atol=1e-5, rtol=1e-5)
            assert res.state.step == 0
        else:  # similar queries: the vote of the call at 30 is reused
            assert res.state.step == 1
        if n > TS["budget"]:  # every head attends to the whole budget
            index, _ = tokenselect.choose(q, *kv[:1], tokenselect.TokenSelectParams(**TS), state)  # type: ignore[arg-type]
            assert index is not None and (index >= 0).sum(-1).tolist() == [[20, 20]]
            assert res.state.positions.shape[2] == TS["budget"] - TS["n_init"] - TS["n_local"]
        state = res.state


def test_tokenselect_selection_of_another_budget_is_not_reused() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 40)
    first = _run("tokenselect", q, k, v, **TS).state
    again = _run("tokenselect", q, k, v, **{**TS, "budget": 24}).state  # same queries: similar
    assert isinstance(again, TokenSet) and again.step == 0 and again.positions.shape[2] == 18
    assert isinstance(first, TokenSet) and first.positions.shape[2] == 14


# -- 2. recycled: the reference's partial steps mask padding ----------------------------------------------
def test_recycled_partial_steps_mask_padding_on_every_backend() -> None:
    """Row 0 holds 8 real tokens of 20 (12 of left padding) with budget 12: the kept set includes padding,
    which no backend may attend to (before the fix the reference's partial steps did: off by ~0.9)."""
    params = {"budget": 12, "stride": 3, "pool": 1}
    q_all, k, v = _qkv(2, 4, 2, 6, 26, seed=3)
    mask = torch.ones(2, 26, device=DEVICE)
    mask[0, :12] = 0.0
    junk_k, junk_v = k.clone(), v.clone()  # other padding content: nothing may change
    junk_k[0, :, :12] = 100.0
    junk_v[0, :, :12] = -50.0
    states: dict[str, Any] = dict.fromkeys(BACKENDS)
    junk_state = None
    partial = 0
    for t, n in enumerate(range(20, 26)):  # full, partial, partial, full, partial, partial
        q = q_all[:, :, t : t + 1]
        outs = {}
        for backend in BACKENDS:
            res = _run("recycled", q, k[:, :, :n], v[:, :, :n], backend=backend, state=states[backend],
                       key_mask=mask[:, :n], **params)  # fmt: skip
            outs[backend] = res.out
            states[backend] = res.state
        junk = _run("recycled", q, junk_k[:, :, :n], junk_v[:, :, :n], backend="reference", state=junk_state,
                    key_mask=mask[:, :n], **params)  # fmt: skip
        junk_state = junk.state
        for backend in ("torch", "triton"):
            torch.testing.assert_close(outs[backend], outs["reference"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(junk.out, outs["reference"], atol=1e-5, rtol=1e-5)
        st = states["reference"]
        assert isinstance(st, TokenSet)
        if st.step % params["stride"] != 1:  # (a partial step just ran)
            partial += 1
            assert bool((st.positions[0] < 12).any())  # padding kept in row 0: the case under test
    assert partial == 4


# -- 3. snapkv: a budget below the observation window is refused --------------------------------------------
def test_snapkv_budget_below_the_window_is_refused() -> None:
    with pytest.raises(ParamError, match=r"budget=8 is invalid; expected >= window=64"):
        attnlab.prepare("snapkv", causal=True, budget=8)  # (the default window)
    with pytest.raises(ParamError, match=r"budget=4 is invalid; expected >= window=8"):
        attnlab.prepare("snapkv", causal=True, budget=4, window=8)
    assert snapkv.SnapKVParams(budget=8, window=8).budget == 8


@pytest.mark.parametrize(("n_q", "n_k"), [(4, 40), (20, 40)])
def test_snapkv_keeps_the_whole_window_and_ranks_the_rest(n_q: int, n_k: int) -> None:
    """A first call with fewer queries than the window (its window: its N_q queries) and one with more:
    the window's tokens are all kept, the rest by score, the same set on every backend."""
    params = {"budget": 12, "window": 8, "kernel": 3}
    q, k, v = _qkv(2, 4, 2, n_q, n_k, seed=5)
    w = min(8, n_q)
    scores = snapkv.scores(q, k, snapkv.SnapKVParams(**params), 0.25)[..., : n_k - w]
    rest = scores.topk(12 - w).indices.sort(-1).values
    want = torch.cat([rest, torch.arange(n_k - w, n_k, device=DEVICE).expand(2, 2, -1)], -1)
    for backend in BACKENDS:
        st = _run("snapkv", q, k, v, backend=backend, **params).state
        assert st.kept is not None and torch.equal(st.kept.long(), want)


# -- 4. a TokenSet belongs to the method that made it ---------------------------------------------------
MADE_BY = {
    "recycled": {"budget": 6, "stride": 4},
    "tokenselect": {"budget": 12, "n_init": 2, "n_local": 4},
    "tidal": {"budget": 6, "role": "select"},
}


@pytest.mark.parametrize("given", list(MADE_BY))
@pytest.mark.parametrize("maker", list(MADE_BY))
def test_a_token_set_from_another_method_is_refused(maker: str, given: str) -> None:
    q, k, v = _qkv(1, 4, 2, 1, 30)
    state = _run(maker, q, k, v, **MADE_BY[maker]).state
    assert isinstance(state, TokenSet) and state.method == maker
    params = {**MADE_BY[given], **({"role": "reuse"} if given == "tidal" else {})}
    for backend in BACKENDS:
        if maker == given:
            _run(given, q, k, v, backend=backend, state=state, **params)
            continue
        with pytest.raises(
            InputError, match=f"TokenSet made by method '{maker}', but it was given to '{given}'"
        ):
            _run(given, q, k, v, backend=backend, state=state, **params)


def test_a_hand_built_token_set_with_holes_reads_alike_everywhere() -> None:
    """A set built by hand (no method) is read by any of them; its holes (< 0) are skipped by the reference
    as by the executors (before the fix the reference raised 'index -1 is out of bounds')."""
    q, k, v = _qkv(1, 4, 2, 1, 30)
    positions = torch.tensor([[[-1, 3, 5], [-1, 4, 6]]], dtype=torch.int32, device=DEVICE)
    for method, params in (
        ("recycled", {"budget": 3, "stride": 4}),
        ("tidal", {"budget": 3, "role": "reuse"}),
    ):
        state = TokenSet(positions, 28, 1)
        outs = [_run(method, q, k, v, backend=b, state=state, **params).out for b in BACKENDS]
        for out in outs[:2]:
            torch.testing.assert_close(out, outs[2], atol=1e-5, rtol=1e-5)


# -- 5. decode-only selections refuse more queries than they serve -----------------------------------------
def test_retrieval_heads_kv_refuses_a_prefill_that_selects() -> None:
    q, k, v = _qkv(1, 4, 2, 64, 64)
    with pytest.raises(InputError, match=r"N_q=64 queries .* expected N_q <= budget - sink = 8"):
        _run("retrieval_heads_kv", q, k, v, budget=8, sink=0)
    with pytest.raises(InputError, match=r"N_q=64 .* expected N_q <= budget - sink = 6"):
        retrieval_heads_kv.reference(q, k, v, retrieval_heads_kv.RetrievalHeadsParams(budget=8, sink=2),
                                     causal=True, scale=0.25)  # fmt: skip
    full = attnlab.attention(q, k, v, method="softmax", causal=True)
    torch.testing.assert_close(_run("retrieval_heads_kv", q, k, v, budget=64).out, full)  # exact: any N_q


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_heads_kv_at_the_query_bound_every_query_sees_its_token(backend: str) -> None:
    """N_q = budget - sink: the first query is the window's first token; one-hot values show that every
    query attends to its own token."""
    n_k, n_q = 30, 6
    q = torch.zeros(1, 2, n_q, 32, device=DEVICE)
    k = torch.randn(1, 1, n_k, 32, device=DEVICE)
    v = torch.eye(32, device=DEVICE)[:n_k].expand(1, 1, n_k, 32).contiguous()
    out = _run("retrieval_heads_kv", q, k, v, backend=backend, budget=8, sink=2).out
    for i in range(n_q):
        seen = torch.nonzero(out[0, 0, i, :n_k] > 0).flatten().tolist()
        assert seen == [0, 1, *range(n_k - n_q, n_k - n_q + i + 1)]


def test_retrieval_heads_kv_needs_a_recent_window() -> None:
    with pytest.raises(ParamError, match=r"sink=8 is invalid; expected less than budget=8"):
        attnlab.prepare("retrieval_heads_kv", causal=True, budget=8, sink=8)


def test_tokenselect_refuses_more_queries_than_its_local_window() -> None:
    q, k, v = _qkv(1, 4, 2, 64, 64)
    params = {"budget": 16, "n_init": 0, "n_local": 4, "threshold": 1.0}
    with pytest.raises(InputError, match=r"N_q=64 queries .* expected N_q <= n_local=4"):
        _run("tokenselect", q, k, v, **params)
    with pytest.raises(InputError, match=r"N_q=64 .* expected N_q <= n_local=4"):
        tokenselect.reference(q, k, v, tokenselect.TokenSelectParams(**params), causal=True, scale=0.25)
    rows = _run("tokenselect", q[:, :, -4:], k, v, **params).out  # at the bound: no empty row
    assert bool((rows.abs().amax(-1) > 0).all())
    full = attnlab.attention(q, k, v, method="softmax", causal=True)
    torch.testing.assert_close(_run("tokenselect", q, k, v, **{**params, "budget": 64}).out, full)


def test_tidal_reuse_refuses_more_queries_than_the_state_holds() -> None:
    q, k, v = _qkv(1, 4, 2, 64, 64)
    chosen = _run("tidal", q, k, v, budget=8, role="select").state  # (a select layer: exact, any N_q)
    assert isinstance(chosen, TokenSet)
    for backend in BACKENDS:
        with pytest.raises(InputError, match=r"'reuse' call with N_q=64 queries over a state of 8 positions"):
            _run("tidal", q, k, v, backend=backend, budget=8, role="reuse", state=chosen)
    with pytest.raises(InputError, match=r"expected N_q <= 8"):
        tidal.reference(q, k, v, tidal.TidalParams(budget=8), causal=True, scale=0.25, state=chosen)
    for backend in BACKENDS:  # at the bound: every query sees a chosen token
        out = _run("tidal", q[:, :, -8:], k, v, backend=backend, role="reuse", state=chosen).out
        assert bool((out.abs().amax(-1) > 0).all())
    stateless = _run("tidal", q, k, v, budget=8, role="reuse").out  # no state: exact
    torch.testing.assert_close(stateless, attnlab.attention(q, k, v, method="softmax", causal=True))
