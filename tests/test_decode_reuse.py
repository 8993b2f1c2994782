"""recycled, tokenselect and tidal: scores written out here, multi-step (and multi-layer) runs of every backend
against the reference, reuse rules, exact fallbacks and bad input (registered for the test only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.catalog.decode import recycled, tidal, tokenselect
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.registry import registered
from attnlab.state import TokenSet
from attnlab.testing import device_under_test

DEVICE = device_under_test()
SPECS = {"recycled": recycled.SPEC, "tokenselect": tokenselect.SPEC, "tidal": tidal.SPEC}


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with registered(recycled.SPEC), registered(tokenselect.SPEC), registered(tidal.SPEC):
        yield


def _qkv(b: int, h: int, h_kv: int, n_q: int, n_k: int, d: int = 16) -> list[torch.Tensor]:
    return [torch.randn(b, x, n, d, device=DEVICE) for x, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))]


def _run(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Result:
    res = attnlab.attention(q, k, v, method=method, causal=True, **kw)
    assert isinstance(res, Result)
    return res


def _ref(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, state: Any) -> Any:
    spec = SPECS[method]
    return spec.reference(q, k, v, spec.make_params(params), causal=True, scale=0.25, state=state)


@pytest.mark.parametrize("method", ["recycled", "tokenselect"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_loop_matches_reference(method: str, backend: str) -> None:
    params = dict(SPECS[method].test_params[0])
    q_all, k, v = _qkv(2, 4, 2, 5, 45)
    if method == "tokenselect":  # similar consecutive queries: the selection cache is used
        q_all = q_all[:, :, :1] + 0.05 * q_all
    state = ref_state = None
    for t, n in enumerate(range(41, 46)):  # recycled (stride 3): full, partial, partial, full, partial
        q = q_all[:, :, t : t + 1]
        res = _run(method, q, k[:, :, :n], v[:, :, :n], backend=backend, state=state, **params)
        want, ref_state = _ref(method, q, k[:, :, :n], v[:, :, :n], params, ref_state)
        torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
        state = res.state
        assert isinstance(state, TokenSet)  # (the triton path keeps top-k order: compare the sets)
        assert torch.equal(state.positions.sort(-1).values, ref_state.positions.sort(-1).values)
    assert state is not None and state.step > 0  # reused at least once


def test_recycled_schedule_and_scores() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 30)
    p = recycled.RecycledParams(budget=6, stride=3, pool=3)
    s = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(2, 3)) * 0.25, -1)[:, :, 0]  # (1, 4, 30)
    want = F.max_pool1d(s.view(1, 2, 2, 30).amax(2), 3, stride=1, padding=1)
    torch.testing.assert_close(recycled.keep_scores(q, k, p, 0.25), want)
    dense = attnlab.attention(q, k, v, method="softmax", causal=True)
    state = None
    fulls = []
    for _ in range(7):
        res = _run("recycled", q, k, v, budget=6, stride=3, pool=3, state=state)
        fulls.append(torch.allclose(res.out, dense, atol=1e-5))
        state = res.state
    assert fulls == [True, False, False, True, False, False, True]  # a full step every 3 calls


def test_recycled_partial_step_sees_kept_and_appended_tokens() -> None:
    kept = torch.tensor([[[1, 5, 9]]], dtype=torch.int32, device=DEVICE)
    state = TokenSet(kept, 12, step=1)
    q = torch.zeros(1, 2, 1, 32, device=DEVICE)
    k = torch.randn(1, 1, 15, 32, device=DEVICE)
    v = torch.eye(32, device=DEVICE)[:15].expand(1, 1, 15, 32).contiguous()
    for backend in ("torch", "triton", "reference"):
        res = _run("recycled", q, k, v, backend=backend, budget=3, stride=4, state=state)
        assert torch.nonzero(res.out[0, 0, 0, :15] > 0).flatten().tolist() == [1, 5, 9, 12, 13, 14]
        assert isinstance(res.state, TokenSet) and res.state.step == 2


def test_tokenselect_votes_and_reuse() -> None:
    q, k, v = _qkv(1, 4, 2, 2, 40)
    qf = q.mean(2)
    per_head = [torch.softmax(qf[0, h] @ k[0, h // 2, 2:36].T, -1) for h in range(4)]
    want = torch.stack([per_head[0] + per_head[1], per_head[2] + per_head[3]])[None]
    torch.testing.assert_close(tokenselect.votes(qf, k, 2, 36), want)
    first = _run("tokenselect", q, k, v, budget=14, n_init=2, n_local=4).state
    assert isinstance(first, TokenSet) and first.positions.shape == (1, 2, 8)
    torch.testing.assert_close(
        first.positions.sort(-1).values, (want.topk(8).indices + 2).sort(-1).values.int()
    )
    again = _run("tokenselect", q, k, v, budget=14, n_init=2, n_local=4, state=first).state
    assert isinstance(again, TokenSet) and again.step == 1 and again.positions is first.positions
    other = _run("tokenselect", -q, k, v, budget=14, n_init=2, n_local=4, state=first).state
    assert isinstance(other, TokenSet) and other.step == 0  # cosine -1: a new vote
    never = _run("tokenselect", q, k, v, budget=14, n_init=2, n_local=4, threshold=1.0, state=first).state
    assert isinstance(never, TokenSet) and never.step == 0


def test_tokenselect_reused_tokens_in_the_local_window_are_not_counted_twice() -> None:
    q, k, v = _qkv(1, 2, 1, 1, 30)
    state = TokenSet(
        torch.tensor([[[5, 24, 25]]], dtype=torch.int32, device=DEVICE), 27, 0, q.float().mean(2)
    )
    params = {"budget": 9, "n_init": 2, "n_local": 4}
    want, _ = _ref("tokenselect", q, k, v, params, state)  # tokens 0, 1, 5, 26..29 (24, 25 left the window)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(
            _run("tokenselect", q, k, v, backend=backend, state=state, **params).out, want
        )
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[0, 1, 5, 24, 25, 26, 27, 28, 29]] = True
    s = (q[0, :, 0] @ k[0, 0].T) * 0.25
    manual = torch.softmax(s.masked_fill(~mask.to(DEVICE), float("-inf")), -1) @ v[0, 0]
    torch.testing.assert_close(want[0, :, 0], manual)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tidal_layers_pass_positions(backend: str) -> None:
    roles = ["full", "select", "reuse", "reuse", "select", "reuse"]
    layers = [_qkv(2, 4, 2, 1, 37) for _ in roles]
    state = ref_state = None
    for role, (q, k, v) in zip(roles, layers, strict=True):
        res = _run("tidal", q, k, v, backend=backend, budget=10, role=role, state=state)
        want, ref_state = _ref("tidal", q, k, v, {"budget": 10, "role": role}, ref_state)
        torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
        state = res.state
        if role == "select":
            assert isinstance(state, TokenSet) and state.positions.shape == (2, 2, 10)
            dense = attnlab.attention(q, k, v, method="softmax", causal=True)
            torch.testing.assert_close(res.out, dense, atol=1e-5, rtol=1e-5)
    q, k, _ = layers[4]
    logits = (q @ k.repeat_interleave(2, 1).transpose(2, 3))[:, :, 0] * 0.25
    want_pos = logits.view(2, 2, 2, 37).amax(2).topk(10).indices.sort(-1).values
    assert isinstance(state, TokenSet) and torch.equal(state.positions.long().sort(-1).values, want_pos)


def test_tidal_reuse_without_state_is_exact_and_appended_tokens_count() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 30)
    dense = attnlab.attention(q, k, v, method="softmax", causal=True)
    res = _run("tidal", q, k, v, budget=5, role="reuse")
    torch.testing.assert_close(res.out, dense)
    assert res.state is None
    chosen = _run("tidal", q[..., :], k[:, :, :28], v[:, :, :28], budget=5, role="select").state
    assert isinstance(chosen, TokenSet)
    later = _run("tidal", q, k, v, budget=5, role="reuse", state=chosen)
    want, _ = _ref("tidal", q, k, v, {"budget": 5, "role": "reuse"}, chosen)
    torch.testing.assert_close(later.out, want)
    assert chosen.index(30).shape == (1, 2, 7)  # 5 chosen + tokens 28, 29 appended since


def test_budget_covering_the_cache_is_exact() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 20)
    dense = attnlab.attention(q, k, v, method="softmax", causal=True)
    for method, params in (
        ("recycled", {"budget": 20, "stride": 2}),
        ("tokenselect", {"budget": 20, "n_init": 1, "n_local": 2}),
        ("tidal", {"budget": 20, "role": "select"}),
    ):
        state = None
        for _ in range(3):
            res = _run(method, q, k, v, state=state, **params)
            torch.testing.assert_close(res.out, dense, atol=1e-5, rtol=1e-5)
            state = res.state


def test_bad_input() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 20)
    with pytest.raises(ParamError, match="budget=5 is invalid; expected >= n_init \\+ n_local = 6"):
        attnlab.prepare("tokenselect", causal=True, budget=5, n_init=2, n_local=4)
    with pytest.raises(ParamError, match="threshold=1.5 is invalid"):
        attnlab.prepare("tokenselect", causal=True, threshold=1.5)
    with pytest.raises(ParamError, match="role='search' is invalid; expected one of full, select, reuse"):
        attnlab.prepare("tidal", causal=True, role="search")
    with pytest.raises(ParamError, match="pool=4 is invalid; expected an odd width"):
        attnlab.prepare("recycled", causal=True, pool=4)
    with pytest.raises(
        InputError, match="tidal: state must be the TokenSet of a selection layer or None, got str"
    ):
        _run("tidal", q, k, v, state="x")
    big = TokenSet(torch.zeros(1, 2, 3, dtype=torch.int32, device=DEVICE), 25)
    with pytest.raises(InputError, match="chosen on a 25-token cache but the cache holds 20"):
        _run("recycled", q, k, v, budget=4, state=big)
