"""Structured static patterns (family ``static``): neighborhoods, strided, power-law, radial, multi-axis.

Mask-defined methods use the static family's backends (:data:`attnlab.catalog.static.MASK_BACKENDS`);
``strided_heads``, whose mask depends on the head, brings its own two. Each method is one module,
imported below, whose ``SPEC`` is listed in :data:`SPECS`.

Not registered yet: registering a method changes shared files in the same commit (the README's support
matrix, and ``tests/test_index_masks.py``, which needs every mask method in its EDGE_CASES and
HAND_DRAWN tables). Until that commit, ``tests/test_structured.py`` registers each method for the
duration of a test (:func:`attnlab.registry.registered`); registering them all is
``for spec in SPECS: register(spec)`` here.
"""
# isort: skip_file

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

__all__ = ["SPECS", "doc_blocks", "multi_axis", "neighborhood", "power", "radial", "strided_heads"]
