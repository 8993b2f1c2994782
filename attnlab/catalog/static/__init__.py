"""Static sparse methods: a fixed, position-defined mask (see :mod:`attnlab.masks`).

All of them use bottom-right aligned positions: query ``i`` sits at ``p = i + N_k - N_q``; key ``j`` at
``j``; ``distance = p - j``. Causal calls also require ``distance >= 0``.
"""

from attnlab.backends.flex import FLEX
from attnlab.backends.sdpa import SdpaMaskBackend

#: The backends of every mask-defined softmax method, in priority order.
MASK_BACKENDS = (FLEX, SdpaMaskBackend())
