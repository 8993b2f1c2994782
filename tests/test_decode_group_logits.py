"""The group-logits kernel (the decode methods' selection scores from the cache read once) against its naive
twin, the twin against logits written out here, and the fast paths of tidal / recycled / tokenselect /
h2o (per step): the ``triton`` backend chooses the same tokens as the ``torch`` backend on inputs without
near-ties, in one piece and in many (``CHUNK_ELEMENTS`` forced small).

On CPU the kernel runs in Triton's interpreter on tiny shapes (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.decode import _common, h2o, recycled, tidal, tokenselect
from attnlab.core import Result
from attnlab.kernels.decode.logits import group_logits, group_logits_naive, logit_chunks
from attnlab.state import StepEvictionState
from attnlab.testing import device_under_test

DEVICE = device_under_test()
NEG = float("-inf")


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """The same -inf entries exactly (and some of each kind), the finite ones within ``tol``."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    inf = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), inf)
    assert not torch.isnan(got).any() and not torch.isposinf(got).any()
    assert (~inf).any()
    torch.testing.assert_close(got[~inf], want[~inf], atol=tol, rtol=tol)


def test_naive_twin_equals_logits_written_out() -> None:
    """GQA 2:1, 2 queries, a range with hi past the cache, padding; and an index with holes and lo/hi."""
    q, k = _randn(2, 4, 2, 8, seed=1), _randn(2, 2, 10, 8, seed=2)
    mask = torch.ones(2, 10, device=DEVICE)
    mask[1, :3] = 0
    got = group_logits_naive(q, k, 0.5, key_mask=mask, lo=2, hi=12)  # tokens 2..11 (10, 11 past N_k)
    idx = torch.tensor([[[7, -1, 0, 9]], [[3, 5, 8, -1]]], device=DEVICE).expand(2, 2, 4)
    got_i = group_logits_naive(q, k, 0.5, causal=False, index=idx, lo=1, hi=8)
    for b in range(2):
        for h in range(4):
            for i in range(2):
                for e, t in enumerate(range(2, 12)):
                    ok = t < 10 and t <= i + 8 and mask[b, t] > 0
                    want = 0.5 * q[b, h, i] @ k[b, h // 2, t] if ok else NEG
                    torch.testing.assert_close(got[b, h, i, e], torch.as_tensor(want, device=DEVICE))
                for e, t in enumerate(idx[b, h // 2].tolist()):
                    ok = 1 <= t < 8
                    want = 0.5 * q[b, h, i] @ k[b, h // 2, t] if ok else NEG
                    torch.testing.assert_close(got_i[b, h, i, e], torch.as_tensor(want, device=DEVICE))


# b, h, h_kv, n_q, n_k, d
SHAPES = [
    (2, 8, 2, 1, 45, 16),  # GQA 4:1, one query
    (1, 3, 3, 3, 40, 24),  # 1:1, 3 queries, head dim 24 (masked columns of a 32-wide tile)
    (2, 8, 2, 3, 33, 32),  # GQA 4:1, 3 queries
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["gqa4-nq1", "mha-nq3", "gqa4-nq3"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernel_matches_naive(shape: tuple[int, ...], dtype: torch.dtype, causal: bool) -> None:
    b, h, h_kv, n_q, n_k, d = shape
    q, k = _randn(b, h, n_q, d, dtype=dtype, seed=3), _randn(b, h_kv, n_k, d, dtype=dtype, seed=4)
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # (bf16 products are exact in fp32: summation order)
    got = group_logits(q, k, 0.3, causal=causal)
    _close(got, group_logits_naive(q, k, 0.3, causal=causal), tol)
    assert got.shape == (b, h, n_q, n_k)
    if causal and n_q > 1:  # bottom-right: query 0 does not see the last n_q - 1 tokens
        assert torch.isneginf(got[:, :, 0, n_k - n_q + 1 :]).all() and torch.isfinite(got[:, :, -1]).all()
    else:
        assert torch.isfinite(got).all()
    # left padding (row 0: 5 tokens; another row: every token but the last, so its first queries see none)
    mask = torch.ones(b, n_k, device=DEVICE)
    mask[0, :5] = 0
    if b > 1:
        mask[-1, : n_k - 1] = 0
    got = group_logits(q, k, 0.3, causal=causal, key_mask=mask)
    _close(got, group_logits_naive(q, k, 0.3, causal=causal, key_mask=mask), tol)
    assert torch.isneginf(got[0, :, :, :5]).all() and torch.isfinite(got[0, :, :, 5 : n_k - n_q + 1]).all()
    if b > 1 and causal and n_q > 1:  # a row with no allowed token
        assert torch.isneginf(got[-1, :, 0]).all() and torch.isfinite(got[-1, :, -1, -1]).all()
    # a range [lo, hi) reaching past the cache, and the padding given as bool
    got = group_logits(q, k, 0.3, causal=causal, key_mask=mask > 0, lo=3, hi=n_k + 5)
    _close(got, group_logits_naive(q, k, 0.3, causal=causal, key_mask=mask, lo=3, hi=n_k + 5), tol)
    assert got.shape[-1] == n_k + 2 and torch.isneginf(got[..., n_k - 3 :]).all()
    # a gather: an index with -1 holes, repeats, tokens past the cache, and lo/hi
    idx = torch.randint(-1, n_k + 3, (b, h_kv, 21), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    idx[0, 0, :4] = -1
    idx[-1, -1] = -1  # a (batch, KV head) with nothing
    for index in (idx, idx.to(torch.int32)):
        got = group_logits(q, k, 0.3, causal=causal, index=index, key_mask=mask)
        _close(got, group_logits_naive(q, k, 0.3, causal=causal, index=idx, key_mask=mask), tol)
        assert torch.isneginf(got[0, : h // h_kv, :, :4]).all() and torch.isneginf(got[-1, -1]).all()
    got = group_logits(q, k, 0.3, causal=causal, index=idx, lo=4, hi=n_k - 6)
    want = group_logits_naive(q, k, 0.3, causal=causal, index=idx, lo=4, hi=n_k - 6)
    _close(got, want, tol)
    outside = ((idx < 4) | (idx >= n_k - 6)).repeat_interleave(h // h_kv, 1)[:, :, None].expand_as(got)
    assert torch.isneginf(got[outside]).all()


def test_mixed_dtypes_and_strided_inputs() -> None:
    """tokenselect's call: an fp32 fingerprint (B, H, 1, D) against a bf16 (or fp16) cache, not causal,
    scale 1; and non-contiguous q / k (a cache slice, transposed heads)."""
    q, k = _randn(2, 8, 1, 32, seed=6), _randn(2, 2, 50, 32, dtype=torch.bfloat16, seed=7)
    got = group_logits(q, k, 1.0, causal=False, lo=4, hi=40)  # (q split into two bf16 halves)
    _close(got, group_logits_naive(q, k, 1.0, causal=False, lo=4, hi=40), 1e-4)
    k16 = k.to(torch.float16)  # (both widened to fp32)
    _close(group_logits(q, k16, 1.0, causal=False), group_logits_naive(q, k16, 1.0, causal=False), 1e-5)
    big = _randn(2, 60, 2, 32, seed=8).transpose(1, 2)  # (2, 2, 60, 32), strides of a (B, N, H, D) buffer
    qs = _randn(2, 3, 8, 32, seed=9).transpose(1, 2)  # (2, 8, 3, 32)
    got = group_logits(qs, big[:, :, :50], 0.2)
    _close(got, group_logits_naive(qs.contiguous(), big[:, :, :50].contiguous(), 0.2), 1e-5)


def test_chunks_cover_the_call() -> None:
    """Pieces of rows (the cache cut to each piece's last visible token) and of KV heads give the logits of
    the whole call."""
    q, k = _randn(2, 8, 3, 16, seed=10), _randn(2, 2, 30, 16, seed=11)
    mask = torch.ones(2, 30, device=DEVICE)
    mask[1, :4] = 0
    idx = torch.stack([torch.randperm(30)[:17] for _ in range(4)]).view(2, 2, 17).to(DEVICE)
    for kw in ({"key_mask": mask}, {"key_mask": mask, "index": idx}, {"causal": False, "lo": 3, "hi": 25}):
        whole = group_logits(q, k, 0.5, **kw)
        n = whole.shape[-1]
        # whole; 2 rows (of 3); 1 row of 1 KV head
        for limit, pieces in ((10**9, 1), (2 * 8 * n * 2, 2), (2 * 4 * n, 6)):
            got = list(logit_chunks(q, k, 0.5, limit, **kw))
            assert len(got) == pieces
            for c in got:
                assert c.logits.numel() <= max(limit, 2 * 4 * n)
                _close(c.logits, whole[:, c.kv0 * 4 : c.kv1 * 4, c.r0 : c.r1], 1e-5)


def test_custom_op_compiles_without_graph_breaks() -> None:
    q, k = _randn(1, 4, 2, 16, seed=12), _randn(1, 2, 20, 16, seed=13)
    idx = torch.tensor([[[3, -1, 19, 7], [0, 1, 2, 30]]], device=DEVICE)

    def f(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (
            group_logits(q, k, 0.5, index=idx).amax(2, keepdim=True)
            + group_logits(q, k, 0.5, lo=2, hi=6)[..., 1:, :]
        )

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, idx)
    torch.testing.assert_close(got, f(q, k, idx))
    assert got.shape == (1, 4, 1, 4)


# --- the methods: the triton backend's selection equals the torch backend's -------------------------------


@pytest.fixture(params=["fused", "whole", "pieces"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'fused': the defaults (tidal's select layer, recycled's full step and h2o's per-step calls attend
    and score in one decode-kernel pass, ``attend_with_logits`` / ``decode_attention_logits``); 'whole':
    those fused passes off (``FUSED_LOGITS_MAX`` 0: exact attention, then the logits kernel); 'pieces':
    off, and every method's ``CHUNK_ELEMENTS`` at 1 (one query row of one KV head per launch)."""
    if request.param != "fused":
        monkeypatch.setattr(_common, "FUSED_LOGITS_MAX", 0)
        monkeypatch.setattr(h2o, "FUSED_LOGITS_MAX", 0)
    if request.param == "pieces":
        for mod in (tidal, recycled, tokenselect, h2o):
            monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 1)
    return str(request.param)


def _call(q: torch.Tensor, k: torch.Tensor, method: str, backend: str, **kw: Any) -> Result:
    res = attnlab.attention(q, k, k.flip(2), method=method, causal=True, scale=0.25, backend=backend, **kw)
    assert isinstance(res, Result)
    return res


def _padding(b: int, n_k: int) -> torch.Tensor:
    mask = torch.ones(b, n_k, device=DEVICE)
    mask[-1, :7] = 0.0
    return mask


def _same_positions(q: torch.Tensor, k: torch.Tensor, method: str, key: str = "positions", **kw: Any) -> Any:
    got = {
        be: getattr(_call(q, k, method, be, **kw).state, key).sort(-1).values for be in ("triton", "torch")
    }
    assert torch.equal(got["triton"], got["torch"])
    return got["torch"]


@pytest.mark.parametrize("n_q", [1, 3])
def test_tidal_selection(n_q: int, chunking: str) -> None:
    q, k = _randn(2, 8, n_q, 16, seed=20), _randn(2, 2, 40, 16, seed=21)
    for mask in (None, _padding(2, 40)):
        pos = _same_positions(q, k, "tidal", budget=12, role="select", key_mask=mask)
        assert pos.shape == (2, 2, 12)
        if mask is not None:
            assert (pos[-1] >= 7).all()  # padding never chosen
    # bf16 with planted scores: one channel carries distinct integers (exact in bf16 and in any order of
    # summation), so the triton path's tensor-core products rank exactly as the reference's
    qb = torch.zeros(1, 4, n_q, 16, device=DEVICE, dtype=torch.bfloat16)
    qb[..., 0] = 1.0
    kb = torch.zeros(1, 2, 40, 16, device=DEVICE, dtype=torch.bfloat16)
    kb[..., 0] = torch.stack([torch.randperm(40), torch.randperm(40)]).to(DEVICE, torch.bfloat16)
    pos = _same_positions(qb, kb, "tidal", budget=5, role="select")
    assert torch.equal(pos[0].long(), kb[0, :, :, 0].float().topk(5).indices.sort(-1).values)


@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("pool", [1, 3])
def test_recycled_full_step_selection(n_q: int, pool: int, chunking: str) -> None:
    q, k = _randn(2, 8, n_q, 16, seed=22), _randn(2, 2, 40, 16, seed=23)
    for mask in (None, _padding(2, 40)):
        pos = _same_positions(q, k, "recycled", budget=10, stride=4, pool=pool, key_mask=mask)
        assert pos.shape == (2, 2, 10)


def test_recycled_row_without_keys_gives_zero_not_nan(chunking: str) -> None:
    """3 queries, padding up to the first query's position: that row sees no key; the scores of the other
    rows (and so of every real token) stay finite and equal the reference's."""
    q, k = _randn(1, 4, 3, 16, seed=24), _randn(1, 2, 20, 16, seed=25)
    valid = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    valid[0, :18] = False  # query 0 sees tokens <= 17: all padding
    p = recycled.RecycledParams(budget=1, stride=2, pool=1)
    fast = recycled.keep_scores(q, k, p, 0.25, valid, fast=True)
    want = recycled.keep_scores(q, k, p, 0.25, valid)
    assert torch.isfinite(fast[..., 18:]).all() and torch.isneginf(fast[..., :18]).all()
    torch.testing.assert_close(fast, want, atol=1e-6, rtol=1e-5)


def test_fused_full_steps_with_a_row_that_sees_no_key(chunking: str) -> None:
    """3 queries, padding up to the first query's position: that row's output is 0 (not NaN) on every
    path, and tidal's and recycled's selections equal the torch backend's."""
    q, k = _randn(1, 4, 3, 16, seed=34), _randn(1, 2, 20, 16, seed=35)
    mask = torch.ones(1, 20, device=DEVICE)
    mask[0, :18] = 0.0  # query 0 sees tokens <= 17: all padding
    for method, kw in (("tidal", {"role": "select"}), ("recycled", {"stride": 2, "pool": 1})):
        _same_positions(q, k, method, budget=1, key_mask=mask, **kw)
        out = _call(q, k, method, "triton", budget=1, key_mask=mask, **kw).out
        assert torch.isfinite(out).all() and (out[:, :, 0] == 0).all()


@pytest.mark.parametrize("padded", [False, True])
def test_tokenselect_vote_selection(padded: bool, chunking: str) -> None:
    q, k = _randn(2, 8, 2, 16, seed=26), _randn(2, 2, 48, 16, seed=27)
    mask = _padding(2, 48) if padded else None
    pos = _same_positions(q, k, "tokenselect", budget=20, n_init=2, n_local=6, threshold=1.0, key_mask=mask)
    assert pos.shape == (2, 2, 12)
    if padded:  # not padding, not the sinks counted from the first real token
        assert ((pos[-1] >= 9) | (pos[-1] < 0)).all()


def test_tokenselect_votes_without_allowed_candidates_are_minus_one(chunking: str) -> None:
    qf, k = _randn(2, 4, 16, seed=28), _randn(2, 2, 30, 16, dtype=torch.bfloat16, seed=29)
    allowed = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    allowed[0, 3:9] = False
    allowed[1] = False  # no candidate at all
    fast = tokenselect.votes(qf, k, 5, 25, allowed, fast=True)
    want = tokenselect.votes(qf, k, 5, 25, allowed)
    # (the fp32 fingerprint goes into the product as two bf16 halves: ~2^-17 of |qf|, logits within ~1e-5)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=1e-3)
    assert (fast[1] == -1).all() and (fast[0, :, 3:9] == -1).all()
    torch.testing.assert_close(
        fast[0, :, :3].sum(-1) + fast[0, :, 9:].sum(-1), torch.full_like(fast[0, :, 0], 2)
    )


@pytest.mark.parametrize(("n_q", "padded"), [(1, False), (3, True)])
def test_h2o_per_step_selection(n_q: int, padded: bool, chunking: str) -> None:
    """Several per-step calls past the budget (the candidates then gathered by index): the same kept tokens
    and scores on both backends."""
    n0 = 10
    n_k = n0 + 4 * n_q  # a prefill, then 4 steps
    q, k = _randn(2, 8, n_k, 16, seed=30), _randn(2, 2, n_k, 16, seed=31)
    mask = _padding(2, n_k) if padded else None
    states: dict[str, Any] = {"triton": None, "torch": None}
    steps = 0
    for end in range(n0, n_k + 1, n_q):
        first = 0 if end == n0 else end - n_q
        for be in states:
            km = None if mask is None else mask[:, :end]
            res = _call(q[:, :, first:end], k[:, :, :end], "h2o", be, budget=8, recent=2, per_step=True,
                        state=states[be], key_mask=km)  # fmt: skip
            assert isinstance(res.state, StepEvictionState)
            states[be] = res.state
        a, b = states["triton"], states["torch"]
        if mask is None:
            assert torch.equal(a.kept, b.kept)
            torch.testing.assert_close(a.score, b.score, atol=1e-6, rtol=1e-5)
            assert torch.equal(a.seen, b.seen)
        else:  # padding ranks -inf: tied, so which padding tokens fill a budget the real ones leave is
            # either's choice (evict_step's docstring); the real tokens kept and their scores agree
            real = [mask[:, :end].gather(1, s.kept.flatten(1).long()).view(s.kept.shape) > 0 for s in (a, b)]
            assert torch.equal(real[0].sum(2), real[1].sum(2))
            for field in ("score", "seen"):
                maps = [
                    torch.zeros(2, 2, end, device=DEVICE)
                    .scatter_(2, s.kept.long(), torch.where(r, getattr(s, field), 0.0))
                    .masked_fill(
                        ~torch.zeros(2, 2, end, dtype=torch.bool, device=DEVICE).scatter_(
                            2, s.kept.long(), r
                        ),
                        -1.0,
                    )
                    for s, r in zip((a, b), real, strict=True)
                ]
                torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-5)
        steps += 1
    assert steps == 5 and states["torch"].kept.shape[2] == 8


def test_h2o_step_weights_row_without_candidates(chunking: str) -> None:
    q, k = _randn(1, 4, 3, 16, seed=32), _randn(1, 2, 20, 16, seed=33)
    cand = torch.tensor([[[2, 5, 18, 19], [0, 1, 18, 19]]], device=DEVICE)  # query 0 (position 17) sees
    valid = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)  # only the padded 0..5 of its candidates
    valid[0, :6] = False
    w, n = h2o._step_weights(q, k, cand, 0.25, valid, fast=True)
    w_ref, n_ref = h2o._step_weights(q, k, cand, 0.25, valid)
    assert torch.isfinite(w).all() and (w[..., :2] == 0).all()
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(n, n_ref)
    torch.testing.assert_close(w.sum(-1), torch.full_like(w[..., 0], 2.0))  # rows 1 and 2: weight 1 each


@pytest.mark.parametrize("n_q", [3, 17], ids=["in-kernel", "reduced-after"])
def test_attend_with_logits_group_max(n_q: int) -> None:
    """attend_with_logits(group_max=True): the per-row logits' maximum over each KV group's query rows,
    written by the kernel (4 x 3 rows) or reduced after it (4 x 17 = 68 rows: more than one row block)."""
    q, k = _randn(1, 8, n_q, 16, seed=36), _randn(1, 2, 90, 16, seed=37)
    v = k.flip(2)
    rows = _common.attend_with_logits(q, k, v, 0.25)
    grouped = _common.attend_with_logits(q, k, v, 0.25, group_max=True)
    assert rows is not None and grouped is not None
    assert torch.equal(grouped[0], rows[0]) and torch.equal(grouped[1], rows[1])
    # independent: causal scores written out (query i at position i + 90 - n_q), max over each group's rows
    s = torch.einsum("bhid,bhnd->bhin", q, k.repeat_interleave(4, 1)) * 0.25
    s = s.masked_fill(
        torch.arange(90, device=DEVICE) > torch.arange(n_q, device=DEVICE)[:, None] + 90 - n_q, -torch.inf
    )
    want = s.unflatten(1, (2, -1)).amax(dim=(2, 3))
    assert grouped[2].shape == (1, 2, 90)
    torch.testing.assert_close(grouped[2], want, atol=1e-5, rtol=1e-5)
