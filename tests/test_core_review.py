"""Defects a review of the core found (session 20), each pinned by a test."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attnlab
from attnlab.catalog.static import sliding_window as sw
from attnlab.errors import InputError
from attnlab.kernels.sdpa import native_gqa, sdpa_dense
from attnlab.plans.executor import executor_tables
from attnlab.plans.plan import Plan
from attnlab.registry import registered


def test_flex_under_no_grad_with_inputs_that_require_grad() -> None:
    """Under ``torch.no_grad()`` dispatch sees a call without gradients and picks Flex (a CPU's default for
    static methods); FlexAttention reads the tensors' own flags and refused "backward on CPU"."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 6, 16, generator=g)
    with torch.no_grad():
        assert attnlab.explain(q, k, k, method="sliding_window", causal=True, window=2).backend is not None
        out = attnlab.attention(q, k, k, method="sliding_window", causal=True, window=2, backend="flex")
        ref = attnlab.attention(q, k, k, method="sliding_window", causal=True, window=2, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_static_plan_cache_tells_two_specs_of_one_name_apart() -> None:
    """A method registered again under its name with another mask gets its own plan (the cache was keyed
    by the name)."""
    base = attnlab.get("sliding_window")

    def mask_a(p: object, ctx: object) -> object:
        return lambda b, h, qi, ki: ctx.causal_ok(ctx.distance(qi, ki))  # type: ignore[attr-defined]

    def mask_b(p: object, ctx: object) -> object:
        return lambda b, h, qi, ki: ctx.causal_ok(ctx.distance(qi, ki)) & (ctx.distance(qi, ki) < 2)  # type: ignore[attr-defined]

    class P(sw.SlidingWindowParams):
        pass

    P.method = "tmp_review_m"
    q = torch.randn(1, 1, 8, 16)
    allowed = []
    for mask in (mask_a, mask_b):
        spec = replace(base, name="tmp_review_m", param_class=P, mask=mask, index_mask=None)
        with registered(spec):
            r = attnlab.attention(
                q, q, q, method="tmp_review_m", causal=True, backend="sdpa_mask", return_plan=True
            )
            allowed.append(int(r.plan.dense_mask().sum()))
    assert allowed == [36, 15]


def test_executor_keeps_every_pair_of_a_full_tile_moved_from_the_key_tail() -> None:
    """A full tile in the last key column (N_k not a multiple of the tile) becomes partial for the
    executor; its pattern is every in-matrix pair, as :meth:`Plan.dense_mask` reads a full tile, not the
    plan's ``mask_mod`` there."""
    full = torch.tensor([[[[False, True]]]])
    plan = Plan(4, 6, False, 4, 4, full, torch.zeros_like(full), lambda b, h, q, k: k < 0, kind="dynamic")
    assert plan.dense_mask()[0, 0, 0].tolist() == [False] * 4 + [True] * 2
    t = executor_tables(plan)
    pattern = t.patterns[int(t.p_pat[0, 0, 0, 0])]
    assert pattern[:, :2].all() and not pattern[:, 2:].any()


@pytest.mark.parametrize("scale", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_bad_scale_is_refused_before_an_op_is_cached(scale: float) -> None:
    from attnlab import api

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(InputError, match="scale must be a positive finite number"):
        attnlab.prepare("softmax", causal=True, scale=scale)
    before = dict(api._OPS)
    with pytest.raises(InputError, match="scale must be a positive finite number"):
        attnlab.attention(q, q, q, causal=True, scale=scale)
    assert before == api._OPS


def test_native_gqa_rule() -> None:
    """SDPA's GQA without its N x N math kernel on CUDA: 16-bit inputs with head dims up to 256."""
    bf, f32 = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16), torch.zeros(1, 4, 2, 128)
    assert native_gqa(bf, bf)
    assert not native_gqa(f32, f32)
    wide = torch.zeros(1, 4, 2, 320, dtype=torch.bfloat16)
    assert not native_gqa(wide, wide)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels")
@pytest.mark.parametrize("causal", [False, True])
def test_float32_gqa_sdpa_on_cuda_builds_no_n_by_n_scores(causal: bool) -> None:
    """float32 with GQA on CUDA: no kernel but math takes ``enable_gqa`` there, so K/V are repeated and the
    memory-efficient kernel runs; peak memory stays far below the (B, H, N, N) float32 scores (2 GiB)."""
    n, h, h_kv = 4096, 32, 8
    q = torch.randn(1, h, n, 64, device="cuda")
    k, v = (torch.randn(1, h_kv, n, 64, device="cuda") for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = sdpa_dense(q, k, v, causal=causal, scale=0.125)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 256 * 2**20, f"{extra / 2**20:.0f} MiB over the inputs"
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=causal, scale=0.125
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
