"""What the linear Triton kernels can take (checked before launch, and by the backend's refusals)."""

from __future__ import annotations

import torch

from attnlab.kernels.triton_utils import head_block

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


#: Shared memory per block on an H100 (opt-in maximum, bytes).
SMEM_SM90 = 232448
#: The largest state tile (BK x BV elements, each the next power of two of its dim) whose chunked backward
#: fits SMEM_SM90, by (gate kind, bytes per input element). Compiled for sm_90 on a CPU machine
#: (``triton.compile``, ``GPUTarget("cuda", 90, 32)``, Triton 3.9; bytes of shared memory):
#: ``chunk_bwd_scalar_kernel`` (one gate per token: linear, lightning) 16-bit 128x128 131072,
#: 256x128 229376, 256x256 393216 (the H100 refused exactly 393216 at 95eba9a-dirty, Hedgehog's 256
#: features with a ones column); float32 128x64 180224, 128x128 278528. ``gla_bwd_sub_kernel`` (per-channel
#: gates: gla) 16-bit 256x128 200704, 256x256 335872; float32 128x128 140288, 256x128 246784.
#: ``gla_bwd_chunk_kernel`` (``op.GLA_BWD_FUSED``; slices of the key dim, so K does not count; chunk 64, 8
#: warps) 16-bit V = 128 126976 (levels unrolled), V = 256 196608; float32 V = 128 102528 (levels in a
#: loop): within these limits.
MAX_BWD_TILE = {("scalar", 2): 256 * 128, ("channel", 2): 256 * 128, ("scalar", 4): 128 * 64,
                ("channel", 4): 128 * 128}  # fmt: skip


def backward_refusals(k_dim: int, v_dim: int, dtype: torch.dtype, *, per_channel: bool) -> list[str]:
    """Why the chunked backward of the gated linear recurrence cannot run these sizes on an H100 (empty:
    it can): its per-chunk kernel holds a whole (K, V) state tile, and large tiles exceed the shared
    memory (see ``MAX_BWD_TILE``)."""
    size = torch.finfo(dtype).bits // 8
    kind = "channel" if per_channel else "scalar"
    limit = MAX_BWD_TILE[(kind, min(size, 4))]
    tile = head_block(k_dim) * head_block(v_dim)
    if tile <= limit:
        return []
    return [
        f"the chunked backward ({'per-channel' if per_channel else 'scalar'} gate) holds a "
        f"{head_block(k_dim)} x {head_block(v_dim)} state tile for K={k_dim}, V={v_dim} in "
        f"{str(dtype).replace('torch.', '')}: over an H100's {SMEM_SM90} B of shared memory (tiles up to "
        f"{limit} elements fit); use bf16/fp16 inputs or smaller head dims, or the torch_chunk backend"
    ]
