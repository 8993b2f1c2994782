"""The four attention patterns of CAB: (non-)causal x self/cross.

Cross-attention is recognised by its shapes: ``N_q != N_k``. Causal cross-attention is aligned
bottom-right, as in CAB and FlashAttention >= 2.1: query ``i`` sits at position ``i + N_k - N_q``
and may see keys ``j <= i + N_k - N_q``::

    N_q = 2, N_k = 5 (x = may attend)      N_q = 5, N_k = 2
    q0: x x x x .                           q0: . .   <- no key: the output row is 0
    q1: x x x x x                           q1: . .
                                            q2: . .
                                            q3: x .
                                            q4: x x
"""

from __future__ import annotations

from enum import StrEnum


class Pattern(StrEnum):
    NONCAUSAL_SELF = "noncausal_self"
    CAUSAL_SELF = "causal_self"
    NONCAUSAL_CROSS = "noncausal_cross"
    CAUSAL_CROSS = "causal_cross"

    @property
    def causal(self) -> bool:
        return self in (Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS)

    @property
    def cross(self) -> bool:
        return self in (Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS)


ALL_PATTERNS: frozenset[Pattern] = frozenset(Pattern)
SELF_PATTERNS: frozenset[Pattern] = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})


def pattern_of(causal: bool, n_q: int, n_k: int) -> Pattern:
    """The pattern of a call: cross when the query and key lengths differ."""
    if n_q == n_k:
        return Pattern.CAUSAL_SELF if causal else Pattern.NONCAUSAL_SELF
    return Pattern.CAUSAL_CROSS if causal else Pattern.NONCAUSAL_CROSS


def parse_pattern(name: str) -> Pattern:
    """A Pattern from its name, with a clear error."""
    try:
        return Pattern(name)
    except ValueError:
        choices = ", ".join(p.value for p in Pattern)
        raise ValueError(f"unknown attention pattern {name!r}; expected one of: {choices}") from None
