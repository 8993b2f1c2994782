"""page_topk (Quest): backends against the reference, the incremental page summary, planted pages, the exact
fallback, and bad input. Run with the method registered for the test only (the lead registers it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.decode import page_topk
from attnlab.core import Result
from attnlab.errors import InputError, ParamError, UnsupportedPatternError
from attnlab.registry import registered
from attnlab.state import PageSummary, summarize
from attnlab.testing import device_under_test

DEVICE = device_under_test()
SPEC = page_topk.SPEC


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with registered(SPEC):
        yield


def _qkv(b, h, h_kv, n_q, n_k, d, dtype=torch.float32):  # type: ignore[no-untyped-def]
    return (
        torch.randn(b, h, n_q, d, device=DEVICE, dtype=dtype),
        torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype),
        torch.randn(b, h_kv, n_k, d, device=DEVICE, dtype=dtype),
    )


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Result:
    res = attnlab.attention(q, k, v, method="page_topk", causal=True, **kw)
    assert isinstance(res, Result)
    return res


def _ref(q, k, v, **params):  # type: ignore[no-untyped-def]
    out, state = SPEC.reference(q, k, v, SPEC.make_params(params), causal=True, scale=q.shape[-1] ** -0.5)
    return out, state


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("params", SPEC.test_params, ids=["max", "mean"])
@pytest.mark.parametrize(("n_q", "n_k"), [(1, 77), (3, 64), (2, 2)])
def test_backend_matches_reference_fp32(backend: str, params: dict, n_q: int, n_k: int) -> None:
    q, k, v = _qkv(2, 4, 2, n_q, n_k, 16)
    res = _run(q, k, v, backend=backend, **params)
    assert isinstance(res.state, PageSummary)
    want, _ = _ref(q, k, v, **params)
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("with_mask", "mode"),
    [(False, ("fused", False)), (True, ("fused", False)), (True, ("triton", False)), (True, ("fused", True)),
     (True, ("triton", True))],
)  # fmt: skip
def test_fast_selection_is_the_reference_rule_over_its_scores(
    with_mask: bool, mode: tuple[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a decoding loop (the selection kernel recomputing the last page each step), the Triton selection
    is exactly the reference's rule applied to the kernel's scores: ``torch.topk``'s pages where no two
    scores tie, the lowest pages among ties, ascending; its summaries equal PyTorch's. Every fast selection
    mode (``page_topk.SMALL_SELECT``: one fused launch, or scores then attnlab's row top-k; elementwise or
    tensor-core bounds)."""
    from attnlab.kernels.decode.naive import row_topk_naive

    monkeypatch.setattr(page_topk, "SMALL_SELECT", mode)

    q_all, k, v = _qkv(2, 4, 2, 6, 90, 16)
    mask = torch.ones(2, 90, device=DEVICE)
    mask[1, :13] = 0  # left padding (used when with_mask)
    state = slow = None
    for t, n in enumerate(range(87, 90)):  # the last page grows, then a new page
        q, kk, vv = q_all[:, :, t : t + 1], k[:, :, :n], v[:, :, :n]
        extra = {"key_mask": mask[:, :n]} if with_mask else {}
        call = attnlab.resolve(q, kk, vv, method="page_topk", causal=True, budget=24, page=4)
        sel, state = page_topk.select(q, kk, vv, call, extra, state, True)
        ref, slow = page_topk.select(q, kk, vv, call, extra, slow, False)
        assert sel is not None and ref is not None
        assert torch.equal(state.valid()[0], slow.valid()[0]) and torch.equal(
            state.valid()[1], slow.valid()[1]
        )
        scores = page_topk._scores_torch(q, *slow.valid(), "max")
        real = slow.real_pages(extra.get("key_mask"))
        if real is not None:
            scores = scores.masked_fill(~real[:, None], float("-inf"))
        scores[..., (n - 1) // 4 :] = float("inf")
        assert torch.equal(sel.index, row_topk_naive(scores, 6))  # no ties in these random scores
        assert torch.equal(sel.index, ref.index.sort(-1).values)
    res = _run(q, kk, vv, backend="triton", budget=24, page=4, **extra)
    want, _ = SPEC.reference(q, kk, vv, SPEC.make_params({"budget": 24, "page": 4}), causal=True,
                             scale=16**-0.5, **extra)  # fmt: skip
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


def test_split_path_above_the_fused_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FUSED_MAX_SCORES with LARGE_SELECT None, the fast path scores with the page-score kernel and
    ranks with torch.topk:
    the reference's pages and output, state kept current over two steps."""
    q_all, k, v = _qkv(2, 4, 2, 2, 77, 16)
    monkeypatch.setattr(page_topk, "FUSED_MAX_SCORES", 0)
    monkeypatch.setattr(page_topk, "LARGE_SELECT", None)
    state = None
    for t, n in enumerate((76, 77)):
        q, kk, vv = q_all[:, :, t : t + 1], k[:, :, :n], v[:, :, :n]
        res = _run(q, kk, vv, backend="triton", budget=32, page=4, state=state)
        state = res.state
        want, _ = _ref(q, kk, vv, budget=32, page=4)
        torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
        call = attnlab.resolve(q, kk, vv, method="page_topk", causal=True, budget=32, page=4)
        sel, _ = page_topk.select(q, kk, vv, call, {}, None, True)
        ref, _ = page_topk.select(q, kk, vv, call, {}, None, False)
        assert sel is not None and ref is not None
        assert torch.equal(sel.index.sort(-1).values, ref.index.sort(-1).values)
    assert isinstance(state, PageSummary) and state.tokens == 77


def test_many_query_rows_take_the_split_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than FAST_SELECT_MAX_ROWS query rows per KV group (GROUP * N_q) do not go to the one-tile
    selection kernel (its register tile holds every row): the split path, the reference's pages."""
    monkeypatch.setattr(page_topk, "FAST_SELECT_MAX_ROWS", 3)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the one-tile selection ran for more rows than it takes")

    monkeypatch.setattr(page_topk, "_fast_select", refused)
    q, k, v = _qkv(1, 4, 2, 2, 77, 16)  # GROUP 2 x N_q 2 = 4 rows > 3
    res = _run(q, k, v, backend="triton", budget=32, page=4)
    want, _ = _ref(q, k, v, budget=32, page=4)
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


def test_bf16_triton_within_the_accuracy_rule() -> None:
    q, k, v = _qkv(1, 8, 2, 1, 90, 32, torch.bfloat16)
    res = _run(q, k, v, backend="triton", budget=32, page=8)
    want, _ = _ref(q, k, v, budget=32, page=8)
    low, _ = SPEC.reference(q, k, v, SPEC.make_params({"budget": 32, "page": 8}), causal=True,
                            scale=32**-0.5, upcast=False)  # fmt: skip
    err = (res.out.float() - want.float()).abs().max()
    err_low = (low.float() - want.float()).abs().max()
    assert err <= 2 * err_low + 0.5 * torch.finfo(torch.bfloat16).eps * want.float().abs().max()


def test_decoding_loop_with_state_matches_reference_each_step() -> None:
    q_all, k, v = _qkv(2, 4, 2, 12, 60, 16)
    op = attnlab.prepare("page_topk", causal=True, budget=20, page=4)
    state = None
    for t, n in enumerate(range(49, 61)):  # tokens appended one at a time, across page boundaries
        q = q_all[:, :, t : t + 1]
        res = op(q, k[:, :, :n], v[:, :, :n], state=state)
        assert isinstance(res, Result)
        state = res.state
        want, _ = _ref(q, k[:, :, :n], v[:, :, :n], budget=20, page=4)
        torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
    assert isinstance(state, PageSummary) and state.tokens == 60


def test_incremental_summary_equals_from_scratch_and_grows() -> None:
    k = torch.randn(2, 3, 150, 8, device=DEVICE)
    state = summarize(k[:, :, :5], 2)
    first_buffer = state.kmax
    for n in (6, 7, 9, 64, 128, 129, 130, 150, 150):
        state = summarize(k[:, :, :n], 2, state)
        fresh = summarize(k[:, :, :n], 2)
        assert state.tokens == n and state.n_pages == -(-n // 2)
        assert torch.equal(state.valid()[0], fresh.valid()[0]) and torch.equal(
            state.valid()[1], fresh.valid()[1]
        )
    assert state.capacity >= 75 and state.kmax is not first_buffer  # outgrew the first 64-page buffer
    blocks = k.view(2, 3, 75, 2, 8)
    assert torch.equal(state.valid()[0], blocks.amax(3)) and torch.equal(state.valid()[1], blocks.amin(3))
    assert state.nbytes() == 2 * 2 * 3 * 75 * 8 * 4


def test_update_touches_only_the_last_page() -> None:
    k = torch.randn(1, 1, 33, 4, device=DEVICE)
    state = summarize(k[:, :, :30], 8)
    state.kmax[:, :, :3] = 100.0  # marks on the pages a step from 30 to 33 tokens must not recompute
    state = summarize(k, 8, state)
    assert (state.kmax[:, :, :3] == 100.0).all()
    torch.testing.assert_close(state.kmax[:, :, 3:5], summarize(k, 8).valid()[0][:, :, 3:5])


def test_planted_page_and_query_pages_are_kept() -> None:
    b, h, h_kv, n_k, d = 1, 4, 2, 256, 16
    q = torch.randn(b, h, 1, d, device=DEVICE)
    k = 0.1 * torch.randn(b, h_kv, n_k, d, device=DEVICE)
    k[0, 1, 37] = 5 * q[0, 3, 0] / q[0, 3, 0].norm()  # head 3 (KV head 1) looks for token 37 (page 9)
    call = attnlab.resolve(q, k, k, method="page_topk", causal=True, budget=16, page=4)
    for fast in (False, True):
        sel, _ = page_topk.select(q, k, k, call, {}, None, fast)
        assert sel is not None and sel.index.shape == (1, 2, 4)
        pages = {int(x) for x in sel.index[0, 1]}
        assert 9 in pages and 63 in pages, pages  # the needle's page, and the page of position 255
        assert 63 in {int(x) for x in sel.index[0, 0]}


def test_budget_at_least_the_context_is_exact_attention() -> None:
    q, k, v = _qkv(2, 4, 2, 3, 40, 16)
    dense = attnlab.attention(q, k, v, method="softmax", causal=True)
    for backend in ("torch", "triton", "reference"):
        res = _run(q, k, v, backend=backend, budget=40, page=4)
        torch.testing.assert_close(res.out, dense, atol=1e-5, rtol=1e-5)
        assert res.state.tokens == 40  # the summary is still kept current
    # a selection that covers every page is exact too
    res = _run(q, k, v, budget=39, page=4)
    assert not torch.allclose(res.out, dense)  # 9 of 10 pages: not exact
    assert page_topk.page_count(3, 40, page_topk.PageTopkParams(budget=39, page=4)) == (10, 9, 9)


def test_cpu_runs_the_torch_backend_by_default() -> None:
    q, k, v = _qkv(1, 2, 1, 1, 50, 16)
    choice = attnlab.explain(q, k, v, method="page_topk", causal=True, budget=16, page=4)
    assert choice.backend is not None
    assert choice.backend.name == ("triton" if DEVICE.type == "cuda" else "torch")


def test_bad_input_is_refused_clearly() -> None:
    q, k, v = _qkv(1, 2, 1, 1, 50, 16)
    with pytest.raises(ParamError, match="page=3 is invalid; expected a power of two"):
        attnlab.prepare("page_topk", causal=True, page=3)
    with pytest.raises(ParamError, match="reduce='sum' is invalid"):
        attnlab.prepare("page_topk", causal=True, reduce="sum")
    with pytest.raises(ParamError, match="budget=0 is invalid"):
        attnlab.prepare("page_topk", causal=True, budget=0)
    with pytest.raises(UnsupportedPatternError, match="does not define the noncausal_cross pattern"):
        attnlab.attention(q, k, v, method="page_topk", causal=False)
    with pytest.raises(
        InputError, match="state must be the PageSummary of an earlier step or None, got dict"
    ):
        attnlab.attention(q, k, v, method="page_topk", causal=True, state={})
    longer = summarize(torch.randn(1, 1, 60, 16, device=DEVICE), 16)
    with pytest.raises(InputError, match="covers 60 tokens but the cache now holds 50"):
        attnlab.attention(q, k, v, method="page_topk", causal=True, state=longer)
    with pytest.raises(InputError, match="has page=16, but this call uses page=8"):
        attnlab.attention(q, k, v, method="page_topk", causal=True, page=8, state=summarize(k, 16))
    other = summarize(torch.randn(1, 2, 50, 16, device=DEVICE), 16)
    with pytest.raises(InputError, match=r"\(B, H_kv, D\) = \(1, 2, 16\), but k has \(1, 1, 16\)"):
        attnlab.attention(q, k, v, method="page_topk", causal=True, state=other)
