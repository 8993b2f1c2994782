"""softcap's ``window`` (Gemma 2/3 sliding layers: soft cap and window together): the reference equals
sliding_window where the cap does not bite and the capped dense softcap where the window does not; the
Flex score_mod is the reference's transform and window; the Triton kernel (no window) refuses it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.catalog.variants import softcap
from attnlab.core import Call, default_scale
from attnlab.inputs import validate

B, H, H_KV, D = 2, 4, 2, 16


def qkv(n_q: int, n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, n_q, D, generator=g) * 3
    k = torch.randn(B, H_KV, n_k, D, generator=g) * 3
    v = torch.randn(B, H_KV, n_k, D, generator=g)
    return q, k, v


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(17, 17, True), (5, 23, True), (17, 17, False)])
def test_the_window_is_sliding_windows_and_the_cap_is_softcaps(n_q: int, n_k: int, causal: bool) -> None:
    q, k, v = qkv(n_q, n_k)
    scale = D**-0.5
    for window in (1, 4, 100):
        got = softcap.reference(q, k, v, softcap.SoftcapParams(1e6, window), causal=causal, scale=scale)
        want = attnlab.attention(q, k, v, method="sliding_window", window=window, causal=causal,
                                 backend="reference")  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a window covering every key is the dense softcap; a small one differs from it (the window bites)
    dense = softcap.reference(q, k, v, softcap.SoftcapParams(2.0), causal=causal, scale=scale)
    wide = softcap.reference(q, k, v, softcap.SoftcapParams(2.0, n_q + n_k), causal=causal, scale=scale)
    torch.testing.assert_close(wide, dense)
    small = softcap.reference(q, k, v, softcap.SoftcapParams(2.0, 3), causal=causal, scale=scale)
    assert (small - dense).abs().max() > 1e-2
    # the public call: eager runs the windowed reference
    got = attnlab.attention(q, k, v, method="softcap", cap=2.0, window=3, causal=causal, backend="eager")
    torch.testing.assert_close(got, small)


def _grid(mod: Any, s: Tensor) -> Tensor:
    b, h, n_q, n_k = s.shape
    idx = [torch.arange(n, dtype=torch.int32).view(*(n if d == a else 1 for d in range(4))) for a, n in
           enumerate((b, h, n_q, n_k))]  # fmt: skip
    return mod(s, *idx).expand_as(s)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_score_mod_caps_and_windows(causal: bool) -> None:
    n_q, n_k, window = 5, 23, 4
    q, k, _ = qkv(n_q, n_k)
    problem = validate(q, k, k, causal=causal, scale=None)
    call = Call(
        softcap.SPEC,
        softcap.SPEC.make_params({"cap": 2.0, "window": window}),
        problem,
        default_scale(D, None),
    )
    s = torch.randn(B, H, n_q, n_k)
    got = _grid(softcap._score(call, {}), s)
    inside = softcap.window_mask(n_q, n_k, window, False, s.device)  # the causal side is the block mask's
    want = torch.where(inside, 2.0 * torch.tanh(s / 2.0), torch.tensor(float("-inf")))
    torch.testing.assert_close(got, want)


def test_triton_refuses_a_window_and_bad_windows_are_named() -> None:
    q, k, v = qkv(8, 8)
    problem = validate(q, k, v, causal=True, scale=None)
    call = Call(
        softcap.SPEC, softcap.SPEC.make_params({"cap": 2.0, "window": 3}), problem, default_scale(D, None)
    )
    triton = next(b for b in softcap.SPEC.backends if b.name == "triton")
    assert any("no window" in why for why in triton.refusals(call))  # (a parameter refusal: param_refusals)
    for bad in (0, -2, 1.5, "4"):
        with pytest.raises(ValueError, match="window"):
            softcap.SPEC.make_params({"cap": 2.0, "window": bad})
