"""Backend choice, in one place: a method's backends are asked in priority order; the first that can run
the call runs it. ``backend=`` forces one. Every refusal is kept, so errors can say why each one refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.backends.base import Backend, Call
from attnlab.backends.eager import REFERENCE
from attnlab.errors import BackendError


@dataclass(frozen=True)
class Choice:
    """The chosen backend and why every backend before it (or every backend, if none) refused."""

    backend: Backend | None
    refusals: tuple[tuple[str, str], ...]

    def explain(self) -> str:
        lines = [f"  - {name}: {why}" for name, why in self.refusals]
        chosen = f"chosen: {self.backend.name}" if self.backend else "no backend can run this call"
        return "\n".join([chosen, *lines])


def choose(call: Call, backend: str | None = None) -> Choice:
    """Pick the backend for ``call`` (``backend``: a name to force, or None for the first that can)."""
    if backend is not None:
        chosen = REFERENCE if backend == "reference" else call.spec.backend(backend)
        ok, why = chosen.can_use(call)
        return Choice(chosen if ok else None, () if ok else ((chosen.name, why),))
    refusals: list[tuple[str, str]] = []
    for candidate in call.spec.backends:
        ok, why = candidate.can_use(call)
        if ok:
            return Choice(candidate, tuple(refusals))
        refusals.append((candidate.name, why))
    return Choice(None, tuple(refusals))


def require(call: Call, backend: str | None = None) -> Backend:
    """The backend to run ``call`` with, or a BackendError listing every refusal."""
    choice = choose(call, backend)
    if choice.backend is None:
        what = (
            f"backend {backend!r} of method {call.spec.name!r} cannot run"
            if backend
            else f"no backend of method {call.spec.name!r} can run"
        )
        reasons = "\n".join(f"  - {name}: {why}" for name, why in choice.refusals)
        raise BackendError(f"{what} {call.problem.describe()}:\n{reasons}")
    return choice.backend
