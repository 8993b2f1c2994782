"""Dynamic methods refuse parameters of the wrong type at ``prepare`` time, with a ParamError naming the
parameter, what was given and what is expected (not a crash deep inside PyTorch at the first call).

A float tile size such as ``64.0`` used to pass ``block in BLOCKS`` (64.0 == 64); block_topk's ``mass``
took the string "0.5" through ``float()``, and its ``sink`` / ``local`` were never checked."""

from __future__ import annotations

import re
from typing import Any

import pytest

import attnlab
from attnlab.errors import ParamError

DYNAMIC = (
    "block_topk",
    "vertical_slash",
    "seer",
    "flexprefill",
    "indexer_topk",
    "dhsa",
    "hip",
    "nsa",
    "bilevel_routing",
    "token_sparse",
)


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize("block", [64.0, "64", True, None])
def test_block_of_wrong_type_is_refused(method: str, block: Any) -> None:
    with pytest.raises(
        ParamError, match=re.escape(f"parameter block={block!r} is invalid; expected an integer")
    ) as info:
        attnlab.prepare(method, causal=True, block=block)
    assert repr(method) in str(info.value)


@pytest.mark.parametrize("method", DYNAMIC)
def test_block_out_of_the_tile_sizes_is_still_refused(method: str) -> None:
    with pytest.raises(ParamError, match="tiles of"):
        attnlab.prepare(method, causal=True, block=24)


@pytest.mark.parametrize("method", DYNAMIC)
def test_valid_block_still_prepares(method: str) -> None:
    op = attnlab.prepare(method, causal=True, block=64)
    assert op is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mass": "0.5"}, r"mass='0\.5' is invalid; expected a finite number"),
        ({"mass": True}, r"mass=True is invalid; expected a finite number"),
        ({"mass": float("nan")}, r"mass=nan is invalid; expected a finite number"),
        ({"sink": 1}, r"sink=1 is invalid; expected True or False"),
        ({"sink": "yes"}, r"sink='yes' is invalid; expected True or False"),
        ({"local": "yes"}, r"local='yes' is invalid; expected True or False"),
        ({"local": 0}, r"local=0 is invalid; expected True or False"),
    ],
)
def test_block_topk_mass_sink_local_types(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamError, match=match):
        attnlab.prepare("block_topk", causal=True, block=64, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mass": 0.5},
        {"mass": 0},  # an int is a number
        {"mass": 1},
        {"sink": False, "local": False, "topk": 1},
        {"sink": True, "local": False, "topk": 1},
    ],
)
def test_block_topk_valid_values_still_prepare(kwargs: dict[str, Any]) -> None:
    assert attnlab.prepare("block_topk", causal=True, block=64, **kwargs) is not None


def test_nsa_sink_message_has_the_common_shape() -> None:
    with pytest.raises(
        ParamError, match=r"method 'nsa': parameter sink=1 is invalid; expected True or False"
    ):
        attnlab.prepare("nsa", causal=True, sink=1)
