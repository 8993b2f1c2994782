"""Static sparse methods: a fixed, position-defined mask (see :mod:`attnlab.masks`).

All of them use bottom-right aligned positions: query ``i`` sits at ``p = i + N_k - N_q``; key ``j`` at
``j``; ``distance = p - j``. Causal calls also require ``distance >= 0``.
"""

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.flex import FLEX
from attnlab.backends.sdpa import SdpaMaskBackend

#: The backends of every mask-defined softmax method, in priority order (FlexAttention first until the
#: benchmark shows where the block-sparse executor wins).
MASK_BACKENDS = (FLEX, BLOCK_SPARSE, SdpaMaskBackend())
