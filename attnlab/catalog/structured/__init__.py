"""Structured static patterns (family ``static``): neighborhoods, strided, power-law, radial, multi-axis.

Mask-defined methods use the static family's backends: FlexAttention first
(:data:`attnlab.catalog.static.MASK_BACKENDS`; power, doc_blocks) or the block-sparse executor first
(:data:`attnlab.catalog.static.EXECUTOR_FIRST`; neighborhood, radial, multi_axis, where it measured faster
on the H100); ``strided_heads``, whose mask depends on the head, brings its own. Each method is one module,
imported below, whose ``SPEC`` is listed in :data:`SPECS`; importing this package registers them, in
that order. Each mask method's index arithmetic, edge cases and hand-drawn grids are in
``tests/test_index_masks.py``.
"""
# isort: skip_file

from attnlab.registry import register

from attnlab.catalog.structured import neighborhood
from attnlab.catalog.structured import strided_heads
from attnlab.catalog.structured import power
from attnlab.catalog.structured import radial
from attnlab.catalog.structured import multi_axis
from attnlab.catalog.structured import doc_blocks

#: The package's methods, in registration order.
SPECS = (
    neighborhood.SPEC,
    strided_heads.SPEC,
    power.SPEC,
    radial.SPEC,
    multi_axis.SPEC,
    doc_blocks.SPEC,
)

for _spec in SPECS:
    register(_spec)

__all__ = ["SPECS", "doc_blocks", "multi_axis", "neighborhood", "power", "radial", "strided_heads"]
