"""Process-wide knobs. Plain attributes; change them in code (nothing is read from the environment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    #: Largest number of score-matrix elements (batch x heads x N_q x N_k) that a dense path (the
    #: reference, the ``eager`` and ``sdpa_mask`` backends) may materialise. 2**28 elements is 1 GiB
    #: in fp32. Above it those paths refuse with a message naming the fast backend to use.
    max_dense_elements: int = 2**28
    #: Query rows per chunk when a mask is evaluated (block classification, density counting).
    mask_chunk_elements: int = 2**24
    #: Autotune attnlab's Triton kernels per (head dim, causal, length bucket, ...). False uses each
    #: kernel's first config (tests do this: fewer compilations, same results).
    autotune: bool = True


settings = Settings()
