"""Mask conventions, checked against values written out by hand (not against the code that defines them)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.masks import MaskContext, dense_mask, dense_pairs
from attnlab.testing import draw_mask


def grid(method: str, n_q: int, n_k: int, causal: bool, **params: int) -> list[str]:
    spec = attnlab.get(method)
    assert spec.mask is not None
    m = dense_mask(spec.mask(spec.make_params(params), MaskContext(n_q, n_k, causal, "cpu")), n_q, n_k, "cpu")
    return draw_mask(m)


def test_sliding_window_counts_keys_including_self() -> None:
    assert grid("sliding_window", 5, 5, True, window=3) == ["x....", "xx...", "xxx..", ".xxx.", "..xxx"]
    assert grid("sliding_window", 5, 5, False, window=2) == ["xx...", "xxx..", ".xxx.", "..xxx", "...xx"]
    assert grid("sliding_window", 4, 4, True, window=1) == ["x...", ".x..", "..x.", "...x"]


def test_causal_cross_is_bottom_right_aligned() -> None:
    assert grid("sliding_window", 2, 5, True, window=10) == ["xxxx.", "xxxxx"]
    assert grid("sliding_window", 5, 2, True, window=10) == ["..", "..", "..", "x.", "xx"]


def test_streaming_sinks_plus_window() -> None:
    assert grid("streaming", 6, 6, True, sinks=1, window=2) == [
        "x.....",
        "xx....",
        "xxx...",
        "x.xx..",
        "x..xx.",
        "x...xx",
    ]
    # non-causal: sinks visible to all, window on both sides
    assert grid("streaming", 5, 5, False, sinks=1, window=2)[4] == "x..xx"


def test_dilated_every_rth_position() -> None:
    assert grid("dilated", 7, 7, True, window=3, dilation=2) == [
        "x......",
        ".x.....",
        "x.x....",
        ".x.x...",
        "x.x.x..",
        ".x.x.x.",
        "..x.x.x",
    ]
    assert grid("dilated", 5, 5, False, window=2, dilation=2)[2] == "x.x.x"


def test_block_local_own_and_previous_block() -> None:
    assert grid("block_local", 6, 6, True, block=2, neighbors=1) == [
        "x.....",
        "xx....",
        "xxx...",
        "xxxx..",
        "..xxx.",
        "..xxxx",
    ]
    assert grid("block_local", 6, 6, True, block=2, neighbors=0) == [
        "x.....",
        "xx....",
        "..x...",
        "..xx..",
        "....x.",
        "....xx",
    ]
    assert grid("block_local", 6, 6, False, block=2, neighbors=0)[0] == "xx...."


@pytest.mark.parametrize(("n_q", "n_k"), [(1, 1), (5, 5), (3, 9), (9, 3), (130, 300), (300, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_pairs_matches_brute_force(n_q: int, n_k: int, causal: bool) -> None:
    i = torch.arange(n_q)[:, None] + n_k - n_q
    j = torch.arange(n_k)[None, :]
    want = int((j <= i).sum()) if causal else n_q * n_k
    assert dense_pairs(n_q, n_k, causal) == want
