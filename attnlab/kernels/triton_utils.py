"""Conventions shared by attnlab's Triton kernels.

- Kernels live in ``kernels/<op>/{fwd,bwd}.py`` (``@triton.jit`` code only), ``naive.py`` (the same math
  in PyTorch, step by step) and ``op.py`` (launchers, autotune configs, ``torch.library.custom_op``
  registration with fake tensors and autograd, so that ``torch.compile`` traces through without breaks).
- Layout (B, H, N, D) with any strides except the last dim, which must be contiguous.
- On CPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernel
  module was first imported (tests use this on tiny shapes); autotuning then uses one small config.
- Tensor descriptors are built in the kernel (``tl.make_tensor_descriptor``, per head, so each head's rows
  end at its own N); the launcher wraps the launch in :func:`descriptor_scratch`.
- Autotuning: a short candidate list keyed by a length bucket. Where a schedule was measured on a GPU in
  interleaved rounds, the prune function leaves it as the only candidate there: Triton's autotuner times
  configs one after another while the clock moves, and has picked configs 4-8% slower (sigmoid/op.py).
- Every forward config the autotuner may run is launchable directly (``config=``) and tested against the
  naive twin (the backward kernels are tested with their first config; the autotuned path runs on the GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

#: Whether Triton can be imported (looked up once: ``torch.compile`` cannot trace importlib).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON_AVAILABLE


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_refusal(device: torch.device, kernel_imported_interpreted: bool | None) -> str:
    """Why a Triton kernel cannot run on ``device`` ('' when it can)."""
    if not triton_available():
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        if kernel_imported_interpreted:
            return "the kernel module was imported with TRITON_INTERPRET=1, so it runs on CPU tensors only"
        return ""
    if device.type == "cpu":
        if kernel_imported_interpreted is False or not interpreting():
            return (
                "Triton kernels need a CUDA GPU; on CPU they run only in Triton's interpreter "
                "(set TRITON_INTERPRET=1 before the first call; slow, meant for tests)"
            )
        return ""
    return f"Triton kernels run on CUDA, not {device.type}"


def tma_copyable(*ts: torch.Tensor, interpreted: bool) -> bool:
    """Whether Hopper's copy engine (TMA, tensor descriptors) can move tiles of these (..., N, D) tensors: a
    GPU of compute capability 9+ (or CPU tensors under the interpreter, ``interpreted``), 16-bit tensors on
    a GPU (see :data:`FP32_SHAPE`: float32 tiles moved by descriptors spill), head dim at most 128 (the
    box sizes measured), 16-byte aligned bases and 16-byte multiples for every stride but the last."""
    t0 = ts[0]
    if head_block(t0.shape[-1]) > 128:
        return False
    if t0.is_cuda:
        if torch.cuda.get_device_capability(t0.device)[0] < 9 or t0.dtype == torch.float32:
            return False
    elif not interpreted:
        return False
    for t in ts:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def head_block(d: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(d))


@contextlib.contextmanager
def descriptor_scratch(device: torch.device) -> Iterator[None]:
    """Global scratch memory for tensor descriptors that kernels build on the device
    (``tl.make_tensor_descriptor``), given to Triton for the launches inside this block only: the
    allocator is a context variable, set here and restored on exit (nothing global is changed)."""

    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    from triton.runtime import _allocation

    token = _allocation._allocator.set(allocate)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


#: (BLOCK_M, BLOCK_N, warps, stages) of the attention kernels (sigmoid, score_transform, block_sparse: forward,
#: dK/dV, dQ) for float32 inputs on a GPU. Their products then run in full fp32 (``input_precision="ieee"``:
#: FMA units, not tensor cores), with every operand tile in registers; larger tiles or fewer warps spill to
#: local memory, which the driver reserves for every thread the GPU can hold when a kernel first launches
#: (bytes x 2048 threads x 132 SMs on an H100). Compiled for sm_90 on a CPU machine
#: (``benchmarks/gpu/offline_resources.py``, Triton 3.9), bytes of stack per thread: the sigmoid forward's
#: 128 x 64 tile with tensor descriptors 17,744 (4.8 GB; the H100 lost 5.1 GB of free memory to one float32
#: parity case at 897709b, and 14 test processes ran out of memory), 7,104 without; 64 x 64 tiles
#: 752-11,568 (D = 64); this shape 0 in all nine kernels at D = 64 and at most 232 at D = 128
#: (benchmarks/results/h100-2026-11-24-s16/fp32/NOTES.md). Not compiled at D = 256. Float32 inputs are
#: for checking, not speed; they also skip TMA (:func:`tma_copyable`).
FP32_SHAPE = (32, 32, 8, 2)


def fp32_tiles(configs: list) -> list:
    """The ``triton.Config`` s of :data:`FP32_SHAPE` (float32 inputs on a GPU), or the smallest tile when
    none is (e.g. a plan whose 16-wide tiles 32 does not divide)."""
    m, n, w, _ = FP32_SHAPE
    exact = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (m, n, w)]
    return exact or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]
