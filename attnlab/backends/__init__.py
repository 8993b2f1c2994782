"""Backends: adapters from a resolved call to an executor, each declaring its capabilities."""

from attnlab.backends.base import Backend, Call, Capabilities, Verdict

__all__ = ["Backend", "Call", "Capabilities", "Verdict"]
