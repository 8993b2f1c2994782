"""``attnlab verify`` checks every backend of every method on at least one case (a parameter set's refusal of
the prefill shapes, e.g. a decode method's query bound, must not leave a backend unchecked)."""

from __future__ import annotations

import torch

import attnlab
from attnlab.verify import DECODE_LENGTHS, verify_cases


def test_every_backend_of_every_method_gets_a_case() -> None:
    have = {(m, b) for m, b, _ in verify_cases(torch.device("cpu"))}
    want = {(name, b.name) for name, spec in attnlab.methods().items() for b in spec.backends}
    assert want - have == set()


def test_decode_methods_are_verified_on_decode_shapes() -> None:
    shapes = {(c.n_q, c.n_k) for m, _, c in verify_cases(torch.device("cpu"), ("tokenselect",))}
    assert shapes and shapes <= set(DECODE_LENGTHS)  # (its query bound refuses the prefill shapes)
