"""What a backend is: a fast (or plain) way to run one method, which says when it can and cannot run.

Backends adapt a :class:`Call` to an executor in :mod:`attnlab.kernels`. Each answers
``can_use(call) -> (ok, reason)``; the chooser (:mod:`attnlab.dispatch`) asks a method's backends in
its priority order, and an error lists every refusal.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from attnlab.inputs import Problem
from attnlab.params import Params

if TYPE_CHECKING:
    from attnlab.registry import MethodSpec

Verdict = tuple[bool, str]
OK: Verdict = (True, "")


@dataclass(frozen=True)
class Call:
    """One resolved call: the method, its validated parameters, the shapes and the scale."""

    spec: MethodSpec
    params: Params
    problem: Problem
    scale: float


class Backend(ABC):
    """A way to run a method. Subclasses set ``name``, ``devices``, ``backward`` and ``summary``."""

    name: str = "?"
    #: device types it runs on, for the support matrix ("cuda", "cpu")
    devices: tuple[str, ...] = ("cuda", "cpu")
    #: whether gradients flow through it (on every device it runs on, unless can_use says otherwise)
    backward: bool = True
    summary: str = ""
    #: where it runs, for the support matrix (default: from ``devices``)
    where: str = ""

    def where_text(self) -> str:
        return self.where or "/".join("GPU" if d == "cuda" else d.upper() for d in self.devices)

    @abstractmethod
    def can_use(self, call: Call) -> Verdict:
        """(True, "") if this backend can run ``call``, else (False, why not, in one sentence)."""

    @abstractmethod
    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """Compute the attention output (B, H, N_q, D_v) in the input dtype."""

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def check_grad(backend: Backend, call: Call) -> Verdict:
    """Refuse when gradients are needed and the backend has no backward."""
    if call.problem.requires_grad and not backend.backward:
        return False, f"{backend.name} has no backward and an input requires grad"
    return OK


def check_device(backend: Backend, call: Call) -> Verdict:
    dev = call.problem.device.type
    if dev not in backend.devices:
        return False, f"{backend.name} runs on {'/'.join(backend.devices)}, not {dev}"
    return OK


def first_refusal(*verdicts: Verdict) -> Verdict:
    """The first failing verdict, or OK."""
    for verdict in verdicts:
        if not verdict[0]:
            return verdict
    return OK
