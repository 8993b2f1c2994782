"""The support matrix's varlen column comes from the backends' ``caps.varlen``."""

from __future__ import annotations

from attnlab.dispatch import PACKED_BY_NAME_ONLY
from attnlab.registry import methods
from attnlab.support import markdown_table, record, varlen_backends


def test_varlen_column_matches_backend_caps() -> None:
    table = markdown_table().splitlines()
    assert "varlen (one launch)" in table[0]
    ncols = table[0].count("|")
    assert all(line.count("|") == ncols for line in table[1:2])
    rows = {line.split("|")[1].strip().strip("`"): line for line in table[2:]}
    seen_varlen = seen_per_sequence = False
    for name, spec in methods().items():
        # Flex declares varlen and takes packed calls per method (FlexBackend.varlen_refusals)
        takes = [not getattr(b, "varlen_refusals", lambda _: [])(spec) for b in spec.backends]
        want = [b.name for b, ok in zip(spec.backends, takes, strict=True) if b.caps.varlen and ok]
        assert varlen_backends(spec) == want
        assert record(spec)["varlen"] == want
        assert [b["varlen"] for b in record(spec)["backends"]] == [b.caps.varlen for b in spec.backends]
        cell = rows[name].rstrip().rstrip("|").rsplit("|", 1)[1].strip()
        if want:  # a backend whose packed path runs only when named is marked so
            assert cell == ", ".join(
                f"`{n}`" + (" (named)" if n in PACKED_BY_NAME_ONLY else "") for n in want
            )
            seen_varlen = True
        else:
            assert cell == "per sequence"
            seen_per_sequence = True
    assert seen_varlen and seen_per_sequence


def test_softmax_lists_block_sparse_for_packed_calls() -> None:
    spec = methods()["softmax"]
    names = [b.name for b in spec.backends]
    assert names[-1] == "block_sparse" and names[:2] == ["sdpa", "flex"]
    assert varlen_backends(spec) == ["flex", "block_sparse"]  # Flex takes packed calls too (CPU: no grad)
