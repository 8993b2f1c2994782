"""Backends: adapters from a resolved call to an executor, each with ``can_use`` and ``run``."""

from attnlab.backends.base import Backend, Call, Verdict

__all__ = ["Backend", "Call", "Verdict"]
