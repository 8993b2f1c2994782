"""snapkv and h2o: scores against kvpress's formulas written out here, prefill-then-decode runs of every backend
against the reference, the kept set, the exact fallback and bad input (registered for the test only)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.catalog.decode import h2o, snapkv
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.registry import registered
from attnlab.state import EvictionState
from attnlab.testing import device_under_test

DEVICE = device_under_test()
SPECS = {"snapkv": snapkv.SPEC, "h2o": h2o.SPEC}


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with registered(snapkv.SPEC), registered(h2o.SPEC):
        yield


def _qkv(b: int, h: int, h_kv: int, n_q: int, n_k: int, d: int = 16) -> list[torch.Tensor]:
    return [torch.randn(b, x, n, d, device=DEVICE) for x, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))]


def _run(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Result:
    res = attnlab.attention(q, k, v, method=method, causal=True, **kw)
    assert isinstance(res, Result)
    return res


def _repeat(k: torch.Tensor, g: int) -> torch.Tensor:
    return k[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)


def test_snapkv_scores_follow_kvpress() -> None:
    b, h, h_kv, n, d, w = 2, 4, 2, 30, 16, 4
    q, k, _ = _qkv(b, h, h_kv, n, n, d)
    attn = q[:, :, -w:] @ _repeat(k, 2).transpose(2, 3) / math.sqrt(d)
    attn = attn + torch.triu(torch.full_like(attn, float("-inf")), diagonal=n - w + 1)
    attn = torch.softmax(attn, dim=-1)[..., :-w]
    s = F.avg_pool1d(attn.mean(-2), kernel_size=3, padding=1, stride=1)
    s = s.view(b, h_kv, 2, n - w).mean(2)
    got = snapkv.scores(q, k, snapkv.SnapKVParams(budget=12, window=w, kernel=3), d**-0.5)
    torch.testing.assert_close(got[..., :-w], s)
    assert torch.isposinf(got[..., -w:]).all()


def test_h2o_scores_follow_kvpress() -> None:
    b, h, h_kv, n, d = 1, 6, 2, 25, 16
    q, k, _ = _qkv(b, h, h_kv, n, n, d)
    attn = q @ _repeat(k, 3).transpose(2, 3) / math.sqrt(d)
    attn = torch.softmax(attn + torch.triu(torch.full_like(attn, float("-inf")), diagonal=1), dim=-1)
    want = (attn.sum(2) / torch.arange(n, 0, -1, device=DEVICE)).view(b, h_kv, 3, n).mean(2)
    got = h2o.scores(q, k, h2o.H2OParams(budget=8), d**-0.5)
    torch.testing.assert_close(got, want)
    plain = h2o.scores(q, k, h2o.H2OParams(budget=8, recent=3, normalize=False), d**-0.5)
    torch.testing.assert_close(plain[..., :-3], attn.sum(2).view(b, h_kv, 3, n).mean(2)[..., :-3])
    assert torch.isposinf(plain[..., -3:]).all()


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_then_decode_matches_reference(method: str, backend: str) -> None:
    spec = SPECS[method]
    params = dict(spec.test_params[0])
    q, k, v = _qkv(2, 4, 2, 43, 43)
    n0 = 40
    res = _run(method, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], backend=backend, **params)
    want, want_state = spec.reference(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], spec.make_params(params),
                                      causal=True, scale=0.25)  # fmt: skip
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
    assert isinstance(res.state, EvictionState) and res.state.kept is not None
    assert torch.equal(res.state.kept, want_state.kept) and res.state.prefix == n0
    state = res.state
    for n in range(n0 + 1, 44):  # decode steps: one query, one appended token each
        step = _run(
            method, q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], backend=backend, state=state, **params
        )
        ref, _ = spec.reference(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], spec.make_params(params),
                                causal=True, scale=0.25, state=state)  # fmt: skip
        torch.testing.assert_close(step.out, ref, atol=1e-5, rtol=1e-5)
        assert step.state is state
    assert state.kept_tokens(43) == params["budget"] + 3


def test_decode_attends_to_exactly_the_kept_and_new_tokens() -> None:
    n0, n = 20, 23
    kept = torch.tensor([[[0, 4, 7, 19]]], dtype=torch.int32, device=DEVICE)
    state = EvictionState(kept, n0)
    q = torch.zeros(1, 2, 1, 32, device=DEVICE)  # uniform weights over the allowed tokens
    k = torch.randn(1, 1, n, 32, device=DEVICE)
    v = torch.eye(32, device=DEVICE)[:n].expand(1, 1, n, 32).contiguous()
    for backend in ("torch", "triton", "reference"):
        out = _run("h2o", q, k, v, backend=backend, budget=4, state=state).out
        seen = torch.nonzero(out[0, 0, 0, :n] > 0).flatten().tolist()
        assert seen == [0, 4, 7, 19, 20, 21, 22]


def test_planted_heavy_hitter_is_kept() -> None:
    q, k, v = _qkv(1, 2, 1, 32, 32)
    k[0, 0, 5] = 4 * q[0, :, -4:].mean((0, 1)) / q[0, :, -4:].mean((0, 1)).norm()  # the window looks at 5
    for method in ("snapkv", "h2o"):
        # SnapKV's pooling spreads a token's score over its neighbours: 5 slots beside the window keep 3..7
        params = {"budget": 9, "window": 4, "kernel": 5} if method == "snapkv" else {"budget": 6}
        state = _run(method, q, k, v, **params).state
        assert isinstance(state, EvictionState) and state.kept is not None
        assert 5 in state.kept[0, 0].tolist()
        if method == "snapkv":
            assert state.kept[0, 0].tolist() == [3, 4, 5, 6, 7, 28, 29, 30, 31]  # and the window


def test_budget_covering_the_prompt_is_exact_throughout() -> None:
    q, k, v = _qkv(1, 4, 2, 30, 30)
    for method, window in (("snapkv", {"window": 4}), ("h2o", {})):  # (snapkv: budget >= window)
        first = _run(method, q[:, :, :28], k[:, :, :28], v[:, :, :28], budget=28, **window)
        assert isinstance(first.state, EvictionState) and first.state.kept is None
        step = _run(method, q[:, :, 29:], k, v, budget=28, state=first.state, **window)
        dense = attnlab.attention(q[:, :, 29:], k, v, method="softmax", causal=True)
        torch.testing.assert_close(step.out, dense)


def test_bad_input() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 30)
    with pytest.raises(ParamError, match="kernel=4 is invalid; expected an odd width"):
        attnlab.prepare("snapkv", causal=True, kernel=4)
    with pytest.raises(ParamError, match="recent=9 is invalid; expected at most budget=8"):
        attnlab.prepare("h2o", causal=True, budget=8, recent=9)
    with pytest.raises(
        InputError, match="state must be the EvictionState of an earlier step or None, got int"
    ):
        _run("snapkv", q, k, v, state=3)
    with pytest.raises(InputError, match="made for a 40-token prompt but the cache holds 30"):
        _run("h2o", q, k, v, state=EvictionState(None, 40))
    other = EvictionState(torch.zeros(1, 3, 4, dtype=torch.int32, device=DEVICE), 20)
    with pytest.raises(InputError, match=r"\(B, H_kv\) = \(1, 3\), but k has \(1, 2\)"):
        _run("h2o", q, k, v, state=other)
