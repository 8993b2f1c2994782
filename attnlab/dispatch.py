"""Backend choice, in one place: a method's backends are asked in priority order (its
``training_backends`` first when an input requires grad); the first that can run the call runs it.
``backend=`` forces one. Every reason every backend refuses is kept (declared capabilities first, then the
backend's own), so errors and :func:`attnlab.explain` can say why.

Packed sequences (``cu_seqlens``): the first backend that declares ``varlen`` and accepts the packed call
runs it in one launch; when none does (or the forced backend does not), the call runs each sequence
separately through this same choice (:attr:`Choice.per_sequence`). On a CPU a Triton backend (interpreted
there) is not chosen automatically for packed calls: the sequences run one by one on the CPU backends.
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
    #: a packed call run per sequence: (the sequences' indices, their choice), one per distinct shape
    #: (filled by :func:`attnlab.explain`)
    sequences: tuple[tuple[tuple[int, ...], Choice], ...] = ()

    @property
    def per_sequence(self) -> bool:
        """A packed call (``cu_seqlens``) that no backend runs in one launch: each sequence runs
        separately through the normal dispatch."""
        return self.call.packing is not None and self.backend is None

    def explain(self) -> str:
        pk = self.call.packing
        if pk is None:
            head = f"method {self.call.spec.name!r} on {self.call.problem.describe()}"
            chosen = (
                f"runs on backend {self.backend.name!r}" if self.backend else "no backend can run this call"
            )
        else:
            head = (
                f"method {self.call.spec.name!r} on {pk.describe()}, packed as {self.call.problem.describe()}"
            )
            chosen = (
                f"runs the packed sequences in one launch on backend {self.backend.name!r}"
                if self.backend
                else "no backend runs the packed sequences in one launch: each sequence runs separately "
                "through the normal dispatch, outputs packed back together"
            )
        lines = [f"{head}:", f"  {chosen}"]
        for name, why in self.refusals:
            lines.append(f"  - {name} refused: {'; '.join(why)}")
        for indices, choice in self.sequences:
            p = choice.call.problem
            which = f"sequence{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))}"
            sub = choice.explain().splitlines()[1:]
            lines.append(f"  {which} (N_q={p.n_q}, N_k={p.n_k}):")
            lines += [f"  {line}" for line in sub]
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
    if call.packing is not None:
        return _choose_packed(call)
    # On a CPU, Triton backends run only in Triton's interpreter (a test aid, orders of magnitude slower):
    # they are chosen automatically there only when no other backend can run the call.
    cpu = call.problem.device.type == "cpu"
    order = call.spec.backends_for(call.problem.requires_grad)
    passed_over: list[tuple[str, tuple[str, ...]]] = []  # (said by explain when a CPU backend runs the call)
    for interpreted in (False, True):
        for candidate in order:
            if (cpu and candidate.triton) != interpreted:
                if not interpreted:
                    passed_over.append((candidate.name, (CPU_TRITON,)))
                continue
            why = candidate.refusals(call)
            if not why:
                said = refusals + passed_over if not interpreted else refusals
                return Choice(call, candidate, tuple(_in_order(said, order)))
            refusals.append((candidate.name, tuple(why)))
    return Choice(call, None, tuple(refusals))


#: Why a Triton backend is passed over on a CPU (listed by explain when another backend runs the call).
CPU_TRITON = (
    "passed over on a CPU: a Triton kernel runs there only in Triton's interpreter (a test aid), chosen only "
    "when no other backend can run the call, or when named with backend=..."
)


def _in_order(
    refusals: list[tuple[str, tuple[str, ...]]], order: tuple[Backend, ...] | list[Backend]
) -> list[tuple[str, tuple[str, ...]]]:
    """``refusals`` in the backends' priority order."""
    rank = {b.name: i for i, b in enumerate(order)}
    return sorted(refusals, key=lambda r: rank.get(r[0], len(rank)))


#: Backends whose one-launch packed path runs only when named (``backend="flex"``), never by default:
#: FlexAttention's varlen (``attnlab.backends.flex``, ae07049) is tested on the CPU only, not yet compiled,
#: checked or timed on a GPU (``benchmarks/flex_varlen_bench.py`` does that), and on a CPU one compiled
#: launch was slower than the sequences one by one on SDPA (softmax, 4K tokens in 8 sequences: 103 ms vs
#: 45 ms, after a ~10 s compile). So a packed call by default keeps the block-sparse executor (GPU) or runs
#: each sequence on its own backend.
PACKED_BY_NAME_ONLY = frozenset({"flex"})


def _choose_packed(call: Call) -> Choice:
    """The first backend that runs packed sequences in one launch, or none (then they run one by one)."""
    refusals: list[tuple[str, tuple[str, ...]]] = []
    cpu = call.problem.device.type == "cpu"
    for candidate in call.spec.backends_for(call.problem.requires_grad):
        why = candidate.refusals(call)
        if not why and cpu and candidate.triton:
            why = [
                "a Triton kernel, interpreted on a CPU: packed sequences run one by one on the CPU backends "
                "instead (backend=... forces it)"
            ]
        if not why and candidate.name in PACKED_BY_NAME_ONLY:
            why = [
                f"its one-launch packed path runs only when named (backend={candidate.name!r}): not yet "
                "checked on a GPU, and slower than one call per sequence on a CPU"
            ]
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
        # (the named backend refused for its size alone, or, dispatching, some dense fallback did: the call
        # is too large for the dense path, whatever the other backends' reasons)
        n_by_n = ["(an N x N tensor)" in r for _, why in choice.refusals for r in why]
        too_large = bool(n_by_n) and (all(n_by_n) if backend is not None else any(n_by_n))
        error = DenseTooLargeError if too_large else BackendError
        hint = ""
        if backend is None and call.want_lse and not REFERENCE.refusals(call):
            hint = "\n  (backend='reference' returns the log-sum-exp on any device: the fp32 reference, dense and slow)"
        raise error(f"{what} {call.problem.describe()}:\n{reasons}{hint}")
    return choice.backend
