"""The softmax variants (attnlab/catalog/variants): each reference against the convention its docstring
states (checked with independent math: SDPA with an explicit bias, an extra key column, rows by hand),
each Flex score_mod and output transform against the reference, the fast paths under the accuracy rule,
and every bad input with its error.

The methods are not in the global registry yet (see ``attnlab/catalog/variants/__init__.py``): each test
registers what it runs for its own duration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlab
from attnlab.catalog.variants import (
    SPECS,
    affine_scaled,
    alibi,
    bias,
    gated,
    selective,
    sink,
    softcap,
    softplus,
)
from attnlab.core import Call, default_scale
from attnlab.errors import BackendError, InputError, ParamError
from attnlab.inputs import validate
from attnlab.testing import Case, check_parity, device_under_test

B, H, H_KV, N_Q, N_K, D = 2, 4, 2, 9, 13, 16
DEVICE = device_under_test()


@pytest.fixture
def variants() -> Iterator[None]:
    """Every variant (registered at import by attnlab.catalog.variants)."""
    assert all(attnlab.get(spec.name) is spec for spec in SPECS)
    yield


def qkv(n_q: int = N_Q, n_k: int = N_K, grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(B, H, n_q, D) * 2
    k = torch.randn(B, H_KV, n_k, D) * 2
    v = torch.randn(B, H_KV, n_k, D)
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)


def causal_bias(n_q: int, n_k: int, causal: bool) -> Tensor:
    """0 where allowed, -inf where not (bottom-right causal), for SDPA's float attn_mask."""
    pos = torch.arange(n_q)[:, None] + n_k - n_q
    ok = torch.arange(n_k)[None, :] <= pos if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    return torch.zeros(n_q, n_k).masked_fill(~ok, float("-inf"))


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor) -> Tensor:
    """SDPA (math kernel, fp32) with a float bias; rows that are all -inf give 0 here (SDPA gives NaN)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    empty = torch.isneginf(attn_bias).all(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_bias.masked_fill(empty, 0.0), scale=1 / D**0.5
    )
    return out.masked_fill(empty, 0.0)


def test_every_variant_is_complete() -> None:
    assert [s.name for s in SPECS] == [
        "softcap", "alibi", "bias", "sink", "softplus", "selective", "gated", "affine_scaled", "lowrank_bias",
    ]  # fmt: skip
    for spec in SPECS:
        assert spec.family == "dense" and spec.param_class.__doc__ and len(spec.reference.__doc__ or "") > 40
        if spec.name == "lowrank_bias":  # no Flex form: the kernel, then the reference
            assert [b.name for b in spec.backends] == ["triton", "eager"]
            assert [t.free_symbols() for t in spec.inputs] == [("R",), ("R",)]
        else:
            kernel = ["triton"] if spec.name in ("softcap", "alibi", "bias", "sink", "softplus") else []
            if spec.name in ("gated", "affine_scaled"):  # cuDNN softmax, then the output transform
                kernel = ["sdpa"]
            after = ["triton"] if spec.name == "selective" else []  # kernel path not timed yet: after Flex
            exact_sdpa = ["sdpa"] if spec.name == "sink" else []  # before the N x N eager path
            if spec.name == "selective":  # SDPA on q * tau first (tests/test_review_s8.py, item d)
                kernel = ["sdpa"]
            fast_first = [*kernel, "flex", *after, *exact_sdpa, "eager"]
            assert [b.name for b in spec.backends] == fast_first
        for kwargs in (*spec.test_params, *spec.bench_params(4096)):
            spec.make_params(kwargs)
        assert spec.params == spec.param_class()
        # the log-sum-exp: every backend but SDPA's for the methods with one (the log of their own normaliser,
        # tests/test_variants_review.py); none for softplus and affine_scaled
        with_lse = {b.name for b in spec.backends if b.caps.lse}
        if spec.name in ("softplus", "affine_scaled"):
            assert not with_lse, spec.name
        else:
            assert with_lse == {b.name for b in spec.backends if b.name != "sdpa"}, spec.name
        assert attnlab.get(spec.name) is spec  # registered at import


# -- each reference states its convention; checked with independent math -----------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_caps_the_scaled_logits(causal: bool) -> None:
    q, k, v = qkv()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) / D**0.5
    for cap in (0.5, 3.0):
        want = sdpa(q, k, v, cap * torch.tanh(s / cap) - s + causal_bias(N_Q, N_K, causal))  # logits = capped
        got = softcap.reference(q, k, v, softcap.SoftcapParams(cap), causal=causal, scale=1 / D**0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    huge = softcap.reference(q, k, v, softcap.SoftcapParams(1e6), causal=causal, scale=1 / D**0.5)
    torch.testing.assert_close(huge, sdpa(q, k, v, causal_bias(N_Q, N_K, causal)), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_are_the_papers() -> None:
    assert alibi.alibi_slopes(8) == [2.0**-e for e in range(1, 9)]
    assert alibi.alibi_slopes(4, max_bias=8.0) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # 6 heads: the 4 slopes of H=4, then every other slope of H=8 (1/2, 1/8)
    assert alibi.alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


@pytest.mark.parametrize(("n_q", "causal"), [(N_Q, False), (N_Q, True), (17, True)])
def test_alibi_is_a_distance_penalty_from_bottom_right_positions(n_q: int, causal: bool) -> None:
    q, k, v = qkv(n_q=n_q)
    slopes = torch.tensor(alibi.alibi_slopes(H))
    pos = torch.arange(n_q)[:, None] + N_K - n_q
    dist = (pos - torch.arange(N_K)[None, :]).abs().float()
    want = sdpa(q, k, v, -slopes[:, None, None] * dist + causal_bias(n_q, N_K, causal))
    got = alibi.reference(q, k, v, alibi.AlibiParams(), causal=causal, scale=1 / D**0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    given = torch.rand(H)
    want = sdpa(q, k, v, -given[:, None, None] * dist + causal_bias(n_q, N_K, causal))
    got = alibi.reference(q, k, v, alibi.AlibiParams(), causal=causal, scale=1 / D**0.5, slopes=given)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(B, H, N_Q, N_K), (1, H, 1, N_K), (B, 1, N_Q, 1)])
def test_bias_is_added_to_the_scaled_logits(shape: tuple[int, ...]) -> None:
    q, k, v = qkv()
    b = torch.randn(shape)
    for causal in (False, True):
        want = sdpa(q, k, v, b + causal_bias(N_Q, N_K, causal))
        got = bias.reference(q, k, v, bias.BiasParams(), causal=causal, scale=1 / D**0.5, bias=b)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # -inf entries mask pairs out; a row left with no key is 0, not NaN
    b = torch.zeros(1, 1, N_Q, N_K)
    b[..., 3, :] = float("-inf")
    got = bias.reference(q, k, v, bias.BiasParams(), causal=False, scale=1 / D**0.5, bias=b)
    assert torch.isfinite(got).all() and not got[:, :, 3].any()


@pytest.mark.parametrize("causal", [False, True])
def test_sink_is_an_extra_logit_column_without_value(causal: bool) -> None:
    n_q = 17  # causal: the first 4 queries sit before every key
    q, k, v = qkv(n_q=n_q)
    logits = torch.randn(H)
    # append one key (zero vector, so q . k = 0) whose bias is the sink logit, and a zero value
    k1 = torch.cat([k, torch.zeros(B, H_KV, 1, D)], dim=2)
    v1 = torch.cat([v, torch.zeros(B, H_KV, 1, D)], dim=2)
    col = torch.cat(
        [causal_bias(n_q, N_K, causal).expand(H, n_q, N_K), logits[:, None, None].expand(H, n_q, 1)], -1
    )
    want = sdpa(q, k1, v1, col)
    got = sink.reference(q, k, v, sink.SinkParams(), causal=causal, scale=1 / D**0.5, sinks=logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if causal:
        assert not got[:, :, :4].any()  # no key: all mass on the sink, output 0
    # the default is the off-by-one softmax: sink logit 0 for every head
    off_by_one = sink.reference(q, k, v, sink.SinkParams(), causal=causal, scale=1 / D**0.5)
    col[:, :, -1] = 0.0
    torch.testing.assert_close(off_by_one, sdpa(q, k1, v1, col), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n_q", "causal"), [(16, False), (17, True)])
def test_sink_extreme_logits_match_the_reference_without_nan(
    dtype: torch.dtype, n_q: int, causal: bool
) -> None:
    """Sink logits at the ends of the range on every CPU backend (the kernel in Triton's interpreter): -inf is
    plain softmax, +inf gives zeros, and finite logits whose sink / scale overflows fp16 (-1e4 at scale 1/8,
    100 at scale 1e-3) give the reference's result, not NaN (the SDPA path carries sink / scale in q's
    dtype). Causal cross 17 x 13: the first 4 rows have no key, 0 also with s_h = -inf (no NaN)."""
    q, k, v = (t.to(dtype) for t in qkv(n_q=n_q))
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"logit": -1e4}, {}),
        ({"logit": 100.0, "scale": 1e-3}, {}),
        ({}, {"sinks": torch.full((H,), float("-inf"))}),
        ({}, {"sinks": torch.full((H,), float("inf"))}),
        ({}, {"sinks": torch.tensor([0.0, 1e30, -1e30, 2.0])[:H]}),
    ]
    for params, extra in cases:
        want = attnlab.attention(
            q.float(),
            k.float(),
            v.float(),
            method="sink",
            causal=causal,
            backend="reference",
            **params,
            **extra,
        )
        assert not want.isnan().any(), (params, extra)
        if causal:
            assert not want[:, :, : n_q - N_K].any()
        if extra.get("sinks") is not None and bool(torch.isinf(extra["sinks"]).all()):
            plain = (
                torch.zeros_like(want)
                if extra["sinks"][0] > 0
                else attnlab.attention(q.float(), k.float(), v.float(), causal=causal)
            )
            torch.testing.assert_close(want, plain, atol=1e-5, rtol=1e-5)
        for backend in ("sdpa", "eager", "triton"):  # (on the device under test: CUDA or the CPU)
            dev = {n: t.to(DEVICE) for n, t in extra.items()}
            got = attnlab.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), method="sink", causal=causal,
                                    backend=backend, **params, **dev).cpu()  # fmt: skip
            assert not got.isnan().any(), (backend, params, extra)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(
                got.float(), want, atol=tol, rtol=tol, msg=f"{backend} {params} {extra}"
            )


def test_sink_logit_gradient_is_the_gpt_oss_formula() -> None:
    q, k, v = qkv()
    logits = torch.randn(H, requires_grad=True)
    out = sink.reference(q, k, v, sink.SinkParams(), causal=True, scale=1 / D**0.5, sinks=logits)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, dout)
    # ds_h = -sum over batch and rows of P_sink,i * (dO_i . O_i), P_sink,i = exp(s_h - LSE_i), LSE with the sink
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) / D**0.5 + causal_bias(
        N_Q, N_K, True
    )
    lse = torch.logsumexp(torch.cat([s, logits.detach()[None, :, None, None].expand(B, H, N_Q, 1)], -1), -1)
    p_sink = torch.exp(logits.detach()[None, :, None] - lse)
    want = -(p_sink * (dout * out.detach()).sum(-1)).sum(dim=(0, 2))
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def _lssa_weights(q: Tensor, k: Tensor) -> Tensor:
    """LSSA's weights as the paper (via its notes) and the third-party reimplementation (models/lssa.py)
    write them: causal self-attention in float64, q and k L2-normalised, ``scores = log(d) * log(n) * q @
    k^T`` with ``n = 1..L`` per row, softplus, causal mask, l1 normalisation."""
    n = q.shape[2]
    qn = F.normalize(q.double(), dim=-1)
    kn = F.normalize(k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1), dim=-1)
    rows = torch.arange(1, n + 1, dtype=torch.float64)
    s = (math.log(D) * torch.log(rows))[:, None] * (qn @ kn.transpose(-2, -1))
    a = F.softplus(s) * torch.ones(n, n, dtype=torch.bool).tril()
    return a / a.sum(-1, keepdim=True)


def _lssa_direct(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _lssa_weights(q, k) @ v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)


@pytest.mark.parametrize("causal", [False, True])
def test_softplus_weights_are_l1_normalised_with_the_length_scale(causal: bool) -> None:
    """Rows by hand: ``softplus(log(D) log(n_i) t cos(q_i, k_j))`` l1-normalised over the row's n_i keys,
    ``t = scale sqrt(D)``; plain softplus (``length_scale=False, qk_norm=False``) on ``scale q . k``; the
    paper's form at the default scale against the sourced transcription; weights sum to 1."""
    n_q = 17
    q, k, v = qkv(n_q=n_q)
    ke, ve = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for scale in (1 / D**0.5, 0.5):
        got = softplus.reference(q, k, v, softplus.SoftplusParams(), causal=causal, scale=scale)
        plain = softplus.reference(
            q, k, v, softplus.SoftplusParams(length_scale=False, qk_norm=False), causal=causal, scale=scale
        )
        for i in (0, 5, n_q - 1):
            keys = min(N_K, i + N_K - n_q + 1) if causal else N_K
            if keys <= 0:  # fully masked rows (causal, N_q > N_K): zeros
                assert not got[:, :, i].any() and not plain[:, :, i].any()
                continue
            dots = torch.einsum("bhd,bhkd->bhk", q[:, :, i], ke[:, :, :keys])
            cos = dots / (q[:, :, i].norm(dim=-1)[..., None] * ke[:, :, :keys].norm(dim=-1))
            for out, s in (
                (got, math.log(D) * math.log(keys) * scale * D**0.5 * cos),
                (plain, scale * dots),
            ):
                w = F.softplus(s)
                want = torch.einsum("bhk,bhkd->bhd", w / w.sum(-1, keepdim=True), ve[:, :, :keys])
                torch.testing.assert_close(out[:, :, i], want, atol=1e-5, rtol=1e-5)
    # the default scale is the paper's logits (causal self-attention: the sources' setting)
    qs, ks, vs = qkv(n_q=N_K)
    paper = softplus.reference(
        qs, ks, vs, softplus.SoftplusParams(), causal=True, scale=default_scale(D, None)
    )
    torch.testing.assert_close(paper, _lssa_direct(qs, ks, vs).float(), atol=1e-5, rtol=1e-5)
    # weights sum to 1 on rows with a key
    ones = softplus.reference(q, k, torch.ones_like(v), softplus.SoftplusParams(), causal=causal, scale=0.3)
    rows = ones[..., 0] != 0
    torch.testing.assert_close(ones[rows], torch.ones_like(ones[rows]))


def test_softplus_flex_and_eager_give_zeros_on_rows_with_no_key(variants: None) -> None:
    """Causal 20 x 12 (bottom-right: the first 8 rows see no key): eager (both forms) and flex (the
    paper's; one compile) equal the reference, and those rows are exactly 0 (D = 32: CPU FlexAttention's
    D = 16 template is wrong, see above)."""
    q, k, v = torch.randn(1, 4, 20, 32) * 2, torch.randn(1, 2, 12, 32) * 2, torch.randn(1, 2, 12, 32)
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("eager", {}),
        ("eager", {"length_scale": False, "qk_norm": False}),
        ("flex", {}),
    )
    for backend, params in cases:
        want = attnlab.attention(q, k, v, method="softplus", causal=True, backend="reference", **params)
        assert not want[:, :, :8].any() and want[:, :, 8:].abs().sum() > 0
        got = attnlab.attention(q, k, v, method="softplus", causal=True, backend=backend, **params)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert not got[:, :, :8].any()


def test_softplus_qk_norm_alone_and_length_scale_alone() -> None:
    """The two options are independent factors: ``qk_norm`` only (cosine times ``t``, no length scale)
    and ``length_scale`` only (``log(D) log(n_i)`` on ``scale q . k``), rows by hand (non-causal)."""
    q, k, v = qkv()
    ke, ve = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scale = 1 / D**0.5
    dots = torch.einsum("bhqd,bhkd->bhqk", q, ke)
    cos = dots / (q.norm(dim=-1)[..., None] * ke.norm(dim=-1)[:, :, None])
    cases = (
        ({"length_scale": False}, cos),  # t = 1 at the default scale
        ({"qk_norm": False}, math.log(D) * math.log(N_K) * scale * dots),
    )
    for kw, s in cases:
        got = softplus.reference(q, k, v, softplus.SoftplusParams(**kw), causal=False, scale=scale)
        w = F.softplus(s)
        torch.testing.assert_close(got, (w / w.sum(-1, keepdim=True)) @ ve, atol=1e-5, rtol=1e-5)


def test_selective_temperature_multiplies_each_querys_logits() -> None:
    q, k, v = qkv()
    tau = torch.rand(B, H, N_Q) * 3
    for causal in (False, True):
        want = sdpa(q * tau[..., None], k, v, causal_bias(N_Q, N_K, causal))  # tau_i * q_i . k_j
        got = selective.reference(q, k, v, selective.SelectiveParams(), causal=causal, scale=1 / D**0.5,
                                  temperature=tau)  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # temperature 0: the plain average of the allowed values; (B, 1, 1) broadcasts
    flat = selective.reference(q, k, v, selective.SelectiveParams(), causal=False, scale=1 / D**0.5,
                               temperature=torch.zeros(B, 1, 1))  # fmt: skip
    torch.testing.assert_close(flat, v.repeat_interleave(2, dim=1).mean(dim=2, keepdim=True).expand_as(flat))


def test_gated_is_sigmoid_gate_times_attention() -> None:
    q, k, v = qkv()
    for g in (torch.randn(B, H, N_Q, D), torch.randn(B, H, N_Q, 1)):  # elementwise and head-wise
        want = torch.sigmoid(g) * sdpa(q, k, v, causal_bias(N_Q, N_K, True))
        got = gated.reference(q, k, v, gated.GatedParams(), causal=True, scale=1 / D**0.5, gate=g)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n_q", "causal"), [(N_Q, False), (N_Q, True), (17, True)])
def test_affine_scaled_weights(n_q: int, causal: bool) -> None:
    q, k, v = qkv(n_q=n_q)
    alpha, beta = torch.rand(B, H, n_q), torch.randn(1, H, n_q)
    got = affine_scaled.reference(q, k, v, affine_scaled.AffineScaledParams(), causal=causal,
                                  scale=1 / D**0.5, alpha=alpha, beta=beta)  # fmt: skip
    ve = v.repeat_interleave(2, dim=1)
    mean = torch.zeros(B, H, n_q, D)
    for i in range(n_q):  # the mean of each row's allowed values, by hand
        keys = min(N_K, i + N_K - n_q + 1) if causal else N_K
        if keys > 0:
            mean[:, :, i] = ve[:, :, :keys].mean(dim=2)
    want = alpha[..., None] * sdpa(q, k, v, causal_bias(n_q, N_K, causal)) + beta[..., None] * mean
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the fast path's running mean is the same
    torch.testing.assert_close(affine_scaled.allowed_mean(v, n_q, causal, H), mean, atol=1e-5, rtol=1e-5)


# -- the Flex paths: score_mods evaluated on the full index grid, output transforms -----------------------


def call_of(spec: Any, q: Tensor, k: Tensor, causal: bool, **params: Any) -> Call:
    problem = validate(q, k, k, causal=causal, scale=None)
    return Call(spec, spec.make_params(params), problem, default_scale(D, None))


def grid_scores(mod: Any, s: Tensor) -> Tensor:
    """A score_mod applied eagerly to every (b, h, q, k) of the scaled logits ``s``."""
    b, h, n_q, n_k = s.shape
    idx = [torch.arange(n, dtype=torch.int32).view(*(n if d == a else 1 for d in range(4))) for a, n in
           enumerate((b, h, n_q, n_k))]  # fmt: skip
    return mod(s, *idx).expand_as(s)


@pytest.mark.parametrize("causal", [False, True])
def test_score_mods_are_the_references_transform(causal: bool) -> None:
    q, k, _ = qkv()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) / D**0.5
    pos = torch.arange(N_Q)[:, None] + N_K - N_Q
    dist = (pos - torch.arange(N_K)[None, :]).abs().float()
    # softcap
    mod = softcap._score(call_of(softcap.SPEC, q, k, causal, cap=2.0), {})
    torch.testing.assert_close(grid_scores(mod, s), 2.0 * torch.tanh(s / 2.0))
    # alibi, default and given slopes
    mod = alibi._score(call_of(alibi.SPEC, q, k, causal), {})
    want = s - torch.tensor(alibi.alibi_slopes(H))[:, None, None] * dist
    torch.testing.assert_close(grid_scores(mod, s), want)
    given = torch.rand(H)
    mod = alibi._score(call_of(alibi.SPEC, q, k, causal), {"slopes": given})
    torch.testing.assert_close(grid_scores(mod, s), s - given[:, None, None] * dist)
    # bias, broadcast dims
    for shape in ((B, H, N_Q, N_K), (1, H, 1, N_K), (B, 1, N_Q, 1)):
        b = torch.randn(shape)
        bias_mod = bias._score(call_of(bias.SPEC, q, k, causal), {"bias": b})
        assert bias_mod is not None
        torch.testing.assert_close(grid_scores(bias_mod, s), s + b)
    assert bias._score(call_of(bias.SPEC, q, k, causal), {}) is None
    # selective
    tau = torch.rand(B, 1, N_Q)
    sel_mod = selective._score(call_of(selective.SPEC, q, k, causal), {"temperature": tau})
    assert sel_mod is not None
    torch.testing.assert_close(grid_scores(sel_mod, s), s * tau[..., None])
    # softplus: log softplus of the length-scaled logits (FlexAttention's softmax of it is the l1 norm)
    # (cos stands for scale * q' . k' of the normalised q', k': |cos| <= 1 / sqrt(D); sqrt(D) makes
    # scale * sqrt(D) the temperature)
    cos = s / s.abs().amax() / D**0.5
    for scaled in (True, False):
        for norm in (True, False):
            mod = softplus._score(call_of(softplus.SPEC, q, k, causal, length_scale=scaled, qk_norm=norm), {})
            n = softplus.row_lengths(N_Q, N_K, causal, torch.device("cpu")).clamp(min=1).float()
            lam = torch.log(n)[:, None] * math.log(D) if scaled else torch.ones(1)
            t = D**0.5 if norm else 1.0
            torch.testing.assert_close(grid_scores(mod, cos), torch.log(F.softplus(cos * (lam * t))))


def test_log_softplus_is_finite_with_finite_gradients() -> None:
    y = torch.tensor([-1e4, -50.0, -20.5, -3.0, 0.0, 3.0, 20.5, 60.0, 1e4], requires_grad=True)
    out = softplus.log_softplus(y)
    torch.testing.assert_close(out[2:7], torch.log(F.softplus(y[2:7])))
    (g,) = torch.autograd.grad(out.sum(), y)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sink_flex_rescaling_from_softmax_and_lse(causal: bool) -> None:
    n_q = 17
    q, k, v = qkv(n_q=n_q)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) / D**0.5 + causal_bias(
        n_q, N_K, causal
    )
    lse = torch.logsumexp(s, dim=-1)  # -inf on rows with no key, as FlexAttention returns it
    plain = sdpa(q, k, v, causal_bias(n_q, N_K, causal))
    logits = torch.randn(H)
    got = sink.rescale(plain, lse, logits)
    want = sink.reference(q, k, v, sink.SinkParams(), causal=causal, scale=1 / D**0.5, sinks=logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


FLEX_CASES = [("softcap", {"cap": 2.0}), ("softplus", {}), ("gated", {}), ("alibi", {}), ("bias", {})]


@pytest.mark.parametrize(("name", "kwargs"), FLEX_CASES, ids=[c[0] for c in FLEX_CASES])
@pytest.mark.parametrize("causal", [False, True])
def test_flex_matches_reference(variants: None, name: str, kwargs: dict[str, Any], causal: bool) -> None:
    spec = attnlab.get(name)
    check = check_parity(spec, "flex", Case(2, 4, 2, 70, 200, 32, torch.float32, causal, kwargs), "cpu")
    assert not check.skipped and check.passed, check.summary()


@pytest.mark.parametrize("causal", [False, True])
def test_flex_with_tensor_inputs_matches_reference(variants: None, causal: bool) -> None:
    # head dim 32: compiled CPU FlexAttention returns wrong rows at D=16 for 70 x 200 (even plain softmax)
    q, k, v = torch.randn(B, H, 70, 32) * 2, torch.randn(B, H_KV, 200, 32) * 2, torch.randn(B, H_KV, 200, 32)
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("gated", {"gate": torch.randn(B, H, 70, 1)}),
        ("affine_scaled", {"alpha": torch.rand(B, H, 70), "beta": torch.randn(1, 1, 70)}),
        ("alibi", {"slopes": torch.rand(H)}),
        ("bias", {"bias": torch.randn(B, 1, 70, 200)}),
        ("selective", {"temperature": torch.rand(B, H, 70) * 2}),
    )
    for name, extra in cases:
        got = attnlab.attention(q, k, v, method=name, causal=causal, backend="flex", **extra)
        want = attnlab.attention(q, k, v, method=name, causal=causal, backend="reference", **extra)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_eager_matches_reference_with_gradients(variants: None, spec: Any) -> None:
    for params in spec.test_params:
        check = check_parity(spec, "eager", Case(2, 4, 2, 33, 47, 16, torch.bfloat16, True, params), "cpu")
        assert check.passed and "dq" in check.errors, check.summary()


def test_tensor_inputs_reach_every_backend_and_their_gradients(variants: None) -> None:
    q, k, v = qkv(grad=True)
    extras = {
        "alibi": {"slopes": torch.rand(H)},
        "bias": {"bias": torch.randn(1, H, N_Q, N_K)},
        "sink": {"sinks": torch.randn(H)},
        "selective": {"temperature": torch.rand(B, H, N_Q)},
        "gated": {"gate": torch.randn(B, H, N_Q, D)},
        "affine_scaled": {"alpha": torch.rand(B, H, N_Q), "beta": torch.randn(B, H, N_Q)},
    }
    for name, extra in extras.items():
        leaves: dict[str, Any] = {n: t.clone().requires_grad_(True) for n, t in extra.items()}
        got = attnlab.attention(q, k, v, method=name, causal=True, **leaves)  # eager: inputs require grad
        want = attnlab.get(name).reference(q, k, v, attnlab.get(name).params, causal=True, scale=1 / D**0.5,
                                           **extra)  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        plain = attnlab.attention(q, k, v, method=name, causal=True)  # the input changes the output
        assert not torch.allclose(got, plain)
        grads = torch.autograd.grad(got.sum(), list(leaves.values()))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name


# -- bad input -----------------------------------------------------------------------------------------------


def test_softcap_must_be_positive() -> None:
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ParamError, match=r"method 'softcap': parameter cap=.* is invalid; expected a"):
            softcap.SoftcapParams(cap)


def test_bad_tensor_inputs_name_what_was_given_and_expected(variants: None) -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match=r"bias has shape \(2, 4, 9, 12\); method 'bias' expects \(B=2, H=4, "
                       r"N_q=9, N_k=13\) where any dim may be 1"):  # fmt: skip
        attnlab.attention(q, k, v, method="bias", bias=torch.randn(B, H, N_Q, N_K - 1))
    with pytest.raises(InputError, match=r"bias has shape \(9, 13\)"):  # 2-D: not broadcast silently
        attnlab.attention(q, k, v, method="bias", bias=torch.randn(N_Q, N_K))
    with pytest.raises(InputError, match=r"sinks has shape \(2\); method 'sink' expects \(H=4\)"):
        attnlab.attention(q, k, v, method="sink", backend="eager", sinks=torch.randn(H_KV))
    with pytest.raises(InputError, match=r"slopes has shape \(8\); method 'alibi' expects \(H=4\)"):
        attnlab.attention(q, k, v, method="alibi", slopes=torch.rand(8))
    with pytest.raises(InputError, match=r"gate has shape \(2, 4, 9, 8\).*\(B=2, H=4, N_q=9, D_v=16\)"):
        attnlab.attention(q, k, v, method="gated", gate=torch.randn(B, H, N_Q, 8))
    with pytest.raises(InputError, match=r"temperature has shape \(2, 4, 9, 1\)"):
        attnlab.attention(q, k, v, method="selective", temperature=torch.rand(B, H, N_Q, 1))
    with pytest.raises(ParamError, match="method 'gated' has no parameter 'gates'"):
        attnlab.attention(q, k, v, method="gated", gates=torch.randn(B, H, N_Q, D))
    with pytest.raises(ParamError, match=r"max_bias=0 is invalid; expected a number > 0"):
        alibi.AlibiParams(max_bias=0)


def test_cpu_refusals_are_explained(variants: None) -> None:
    q, k, v = qkv()
    with pytest.raises(BackendError, match="compiled FlexAttention on CPU cannot return the log-sum-exp"):
        attnlab.attention(q, k, v, method="sink", backend="flex")
    with pytest.raises(InputError, match=r"needs head dim D >= 2 .*, got D=1"):
        softplus.reference(q[..., :1], k[..., :1], v, softplus.SoftplusParams(), causal=False, scale=1.0)


def test_flex_and_kernel_paths_compile_without_graph_breaks(variants: None) -> None:
    dev = device_under_test()  # (the Triton kernel runs on a GPU, or in the interpreter on a CPU)
    q, k, v = (torch.randn(1, h, 64, 32, device=dev) for h in (4, 2, 2))
    b, g = torch.randn(1, 4, 64, 64, device=dev), torch.randn(1, 4, 64, 1, device=dev)
    calls: dict[str, tuple[str | None, dict[str, Any]]] = {
        "bias": ("flex", {"bias": b}),  # a score_mod capturing a tensor input
        "softcap": ("triton", {"cap": 2.0}),  # the Triton kernel's custom op
        "gated": (None, {"gate": g}),  # SDPA softmax, then the gate
    }
    for name, (backend, kwargs) in calls.items():

        def f(
            q: Tensor, k: Tensor, v: Tensor, name: str = name, backend: Any = backend, kw: Any = kwargs
        ) -> Any:
            return attnlab.attention(q, k, v, method=name, causal=True, backend=backend, **kw)

        with torch.no_grad():
            out = torch.compile(f, fullgraph=True)(q, k, v)
        ref = attnlab.attention(q, k, v, method=name, causal=True, backend="reference", **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "grads"), [("gated", ("dgate",)), ("affine_scaled", ("dalpha", "dbeta"))])
def test_sdpa_backend_of_output_transforms_matches_reference(variants: None, name: str, grads: tuple) -> None:
    """gated and affine_scaled on plain SDPA softmax + their output transform (first backend: cuDNN speed
    on the GPU): the registry's parity rule, bf16, GQA, cross shapes, with the tensor inputs drawn and
    requiring grad (every gradient checked, the gate's and alpha/beta's included)."""
    spec = attnlab.get(name)
    assert spec.backends[0].name == "sdpa"
    for causal in (False, True):
        case = Case(2, 4, 2, 17, 30, 16, torch.bfloat16, causal, optional_inputs=True)
        check = check_parity(spec, "sdpa", case, "cpu")
        assert not check.skipped and check.passed, check.summary()
        assert all(g in check.errors for g in ("dq", "dk", "dv", *grads)), check.summary()
    # N_q > N_k causal: rows with no key stay 0 after the transform
    q, k, v = qkv()
    extra: dict[str, Any] = (
        {"gate": torch.randn(B, H, N_Q, D)} if name == "gated" else {"beta": torch.randn(B, H, N_Q)}
    )
    out = attnlab.attention(q, k[:, :, :4], v[:, :, :4], method=name, causal=True, backend="sdpa", **extra)
    assert not out[:, :, : N_Q - 4].any()


def _lssar_direct(q: Tensor, k: Tensor, v: Tensor, p: int) -> Tensor:
    """LSSAR as the third-party reimplementation writes it (causal self, float64, no log-domain trick):
    LSSA weights, then relu(A * n - O)^p with O = 1 except the first 3 rows, then l1 normalisation."""
    n = q.shape[2]
    rows = torch.arange(1, n + 1, dtype=torch.float64)
    a = _lssa_weights(q, k)
    offset = torch.ones(n, dtype=torch.float64)
    offset[:3] = 0.0
    r = torch.relu(a * rows[:, None] - offset[:, None]) ** p
    r = r / torch.where(
        r.sum(-1, keepdim=True) > 0, r.sum(-1, keepdim=True), torch.ones(1, dtype=torch.float64)
    )
    return torch.matmul(r, v.double().repeat_interleave(H // H_KV, dim=1)).float()


@pytest.mark.parametrize("p", [3, 15])
def test_softplus_reweight_is_the_sourced_formula(p: int) -> None:
    """reweight=p against a direct float64 transcription of the sourced formula (causal self), and causal
    cross rows equal the last rows of the self-attention call (the shift and n_i follow positions)."""
    q, k, v = qkv(20, 20)
    q = q * 3
    got = softplus.reference(q, k, v, softplus.SoftplusParams(reweight=p), causal=True, scale=1 / D**0.5)
    torch.testing.assert_close(got, _lssar_direct(q, k, v, p), atol=1e-4, rtol=1e-4)
    cross = softplus.reference(q[:, :, -6:], k, v, softplus.SoftplusParams(reweight=p), causal=True,
                               scale=1 / D**0.5)  # fmt: skip
    torch.testing.assert_close(cross, got[:, :, -6:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, softplus.reference(q, k, v, softplus.SoftplusParams(), causal=True,
                                                      scale=1 / D**0.5))  # fmt: skip


def test_softplus_reweight_runs_on_eager_with_gradients_and_does_not_overflow(variants: None) -> None:
    """eager (the only backend with the stage; Triton and Flex refuse, naming eager) under the parity rule
    with every gradient, and at N=600, p=15 where (a n)^p reaches 600^15 > fp32's range: finite."""
    spec = attnlab.get("softplus")
    check = check_parity(
        spec, "eager", Case(1, 4, 2, 33, 47, 16, torch.bfloat16, True, {"reweight": 3}), "cpu"
    )
    assert check.passed and "dq" in check.errors, check.summary()
    q, k, v = qkv(9, 13)
    for backend in ("triton", "flex"):
        with pytest.raises(
            BackendError, match=r"no re-weighting stage \(reweight=3\).*backend='eager' runs it"
        ):
            attnlab.attention(q, k, v, method="softplus", causal=True, backend=backend, reweight=3)
    chosen = attnlab.prepare("softplus", causal=True, reweight=3).explain(q, k, v).backend
    assert chosen is not None and chosen.name == "eager"
    x = torch.randn(1, 1, 600, D) * 3
    out = softplus.reference(x, x, x, softplus.SoftplusParams(reweight=15), causal=True, scale=1 / D**0.5)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_softplus_reweight_bad_input_is_named() -> None:
    q, k, v = qkv()
    with pytest.raises(InputError, match=r"reweight=3 .* causal attention only.*got causal=False"):
        attnlab.attention(q, k, v, method="softplus", causal=False, backend="eager", reweight=3)
    for bad in (-1, 65, True, 2.0):
        with pytest.raises(ParamError, match=r"method 'softplus': parameter reweight=.* is invalid"):
            softplus.SoftplusParams(reweight=bad)  # type: ignore[arg-type]
