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
    GPU of compute capability 9+ (or CPU tensors under the interpreter, ``interpreted``), head dim at most
    128 (the box sizes measured), 16-byte aligned bases and 16-byte multiples for every stride but the last."""
    t0 = ts[0]
    if head_block(t0.shape[-1]) > 128:
        return False
    if t0.is_cuda:
        if torch.cuda.get_device_capability(t0.device)[0] < 9:
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
