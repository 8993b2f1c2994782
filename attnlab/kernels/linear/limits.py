"""What the linear Triton kernels can take (checked before launch, and by the backend's refusals)."""

from __future__ import annotations

#: Chunk sizes the chunked kernels are compiled for (a tl.dot needs >= 16 rows; the intra-chunk tile is
#: chunk x chunk).
CHUNKS = (16, 32, 64)
#: The largest key feature dim (the state's rows sit whole in one tile) and value dim.
MAX_K = 256
MAX_V = 256


def kernel_refusals(chunk: int, k_dim: int, v_dim: int) -> list[str]:
    """Every reason the chunked kernels cannot take these sizes (empty: they can)."""
    out = []
    if chunk not in CHUNKS:
        out.append(
            f"the Triton kernels take chunk sizes {', '.join(map(str, CHUNKS))}, not chunk={chunk} "
            "(the torch_chunk backend takes any)"
        )
    if k_dim > MAX_K:
        out.append(f"the Triton kernels take key feature dims up to {MAX_K}, got {k_dim}")
    if v_dim > MAX_V:
        out.append(f"the Triton kernels take value dims up to {MAX_V}, got {v_dim}")
    return out
