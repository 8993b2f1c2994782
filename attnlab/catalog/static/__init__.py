"""Static sparse methods: a fixed, position-defined mask (see :mod:`attnlab.masks`).

All of them use bottom-right aligned positions: query ``i`` sits at ``p = i + N_k - N_q``; key ``j`` at
``j``; ``distance = p - j``. Causal calls also require ``distance >= 0``.
"""

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.flex import FLEX
from attnlab.backends.sdpa import SdpaMaskBackend

#: The backends of every mask-defined softmax method, in priority order: FlexAttention first where the
#: benchmark shows it level with the block-sparse executor or ahead (within a few per cent either way for
#: sliding_window, streaming and block_local at 64K, benchmarks/results/h100-2026-11-23-s2/bench-64k/).
MASK_BACKENDS = (FLEX, BLOCK_SPARSE, SdpaMaskBackend())
#: The executor first: for masks whose every tile is partial (dilated), where it runs 1.35-1.65x faster
#: than FlexAttention forward and forward + backward at 64K in the same run, for neighborhoods (2-D and
#: 3-D at 16K: 4.6-8.3x, benchmarks/results/h100-2026-11-24/neighborhoods/; 1-D window 512: 1.2-1.4x) and
#: for radial (2.1-2.5x at 16K with frame 512; the default frame 1024 was not timed) and multi_axis
#: (2.4-3.3x at 16K), benchmarks/results/h100-2026-11-24/structured/.
EXECUTOR_FIRST = (BLOCK_SPARSE, FLEX, MASK_BACKENDS[2])
