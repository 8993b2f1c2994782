"""Backend choice, in one place: a method's backends are asked in priority order (its
``training_backends`` first when an input requires grad); the first that can run the call runs it. ``backend=`` forces one. Every reason every backend refuses is kept (declared
capabilities first, then the backend's own), so errors and :func:`attnlab.explain` can say why.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.backends.eager import REFERENCE
from attnlab.core import Backend, Call
from attnlab.errors import BackendError, DenseTooLargeError


@dataclass(frozen=True)
class Choice:
    """The backend chosen for a call and why every backend before it (or every backend, if none) refused.

    Prints as a few readable lines (``print(attnlab.explain(...))`` or just the REPL echo)."""

    call: Call
    backend: Backend | None
    refusals: tuple[tuple[str, tuple[str, ...]], ...]

    def explain(self) -> str:
        head = f"method {self.call.spec.name!r} on {self.call.problem.describe()}"
        chosen = f"runs on backend {self.backend.name!r}" if self.backend else "no backend can run this call"
        lines = [f"{head}:", f"  {chosen}"]
        for name, why in self.refusals:
            lines.append(f"  - {name} refused: {'; '.join(why)}")
        return "\n".join(lines)

    __str__ = explain

    def __repr__(self) -> str:
        return self.explain()


def choose(call: Call, backend: str | None = None) -> Choice:
    """Pick the backend for ``call`` (``backend``: a name to force, or None for the first that can)."""
    if backend is not None:
        chosen = REFERENCE if backend == "reference" else call.spec.backend(backend)
        why = chosen.refusals(call)
        return Choice(call, None if why else chosen, ((chosen.name, tuple(why)),) if why else ())
    refusals: list[tuple[str, tuple[str, ...]]] = []
    # On a CPU, Triton backends run only in Triton's interpreter (a test aid, orders of magnitude slower):
    # they are chosen automatically there only when no other backend can run the call.
    cpu = call.problem.device.type == "cpu"
    order = call.spec.backends_for(call.problem.requires_grad)
    for interpreted in (False, True):
        for candidate in order:
            if (cpu and candidate.triton) != interpreted:
                continue
            why = candidate.refusals(call)
            if not why:
                return Choice(call, candidate, tuple(refusals))
            refusals.append((candidate.name, tuple(why)))
    return Choice(call, None, tuple(refusals))


def require(call: Call, backend: str | None = None) -> Backend:
    """The backend to run ``call`` with, or a BackendError listing every refusal."""
    choice = choose(call, backend)
    if choice.backend is None:
        what = (
            f"backend {backend!r} of method {call.spec.name!r} cannot run"
            if backend
            else f"no backend of method {call.spec.name!r} can run"
        )
        reasons = "\n".join(f"  - {name}: {'; '.join(why)}" for name, why in choice.refusals)
        too_large = backend is not None and all(
            "(an N x N tensor)" in r for _, why in choice.refusals for r in why
        )
        error = DenseTooLargeError if too_large else BackendError
        raise error(f"{what} {call.problem.describe()}:\n{reasons}")
    return choice.backend
