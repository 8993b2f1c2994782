"""Method parameters: one frozen dataclass per method, with defaults and validation.

A method's parameters class subclasses :class:`Params` and overrides :meth:`Params.validate`, using the
``check_*`` helpers so that every message has the same shape: the method, the parameter, what was given
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from attnlab.errors import ParamError, did_you_mean


@dataclass(frozen=True)
class Params:
    """Base of every method's parameters. Subclasses are frozen dataclasses."""

    #: The method these parameters belong to (set by each subclass; used in messages).
    method: ClassVar[str] = "?"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ParamError if a value is out of range. Override in subclasses."""

    def check_lengths(self, n_q: int, n_k: int) -> None:
        """Raise InputError when these parameters cannot serve N_q queries over N_k keys (e.g. a grid whose
        product is not the sequence length). Called when a call is resolved (``attention``, ``explain``,
        ``resolve``; each packed sequence on its own), so that a call refused when its mask is built is
        refused before a backend is named. Default: any lengths."""

    def head_dim_limit(self) -> int | None:
        """The largest q/k head dim these parameters take (None: any). A method whose backends refuse larger
        head dims by design overrides it; the parity cases make no case above it."""
        return None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Self:
        """Build the parameters from keyword arguments; unknown names get a close-match suggestion."""
        try:
            return cls(**kwargs)
        except TypeError:  # an unknown keyword (the dataclass __init__ refuses it)
            known = cls.names()
            for name in kwargs:
                if name not in known:
                    allowed = ", ".join(known) if known else "none"
                    raise ParamError(
                        f"method {cls.method!r} has no parameter {name!r}.{did_you_mean(name, known)} "
                        f"Its parameters are: {allowed}"
                    ) from None
            raise

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> tuple[Any, ...]:
        """A hashable identity of these values (for caches)."""
        return (type(self).__name__, *dataclasses.astuple(self))

    # -- checks used by validate() ------------------------------------------------------------------
    def _fail(self, name: str, value: Any, expected: str) -> ParamError:
        return ParamError(
            f"method {self.method!r}: parameter {name}={value!r} is invalid; expected {expected}"
        )

    def check_int(self, name: str, minimum: int = 1, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, value, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise self._fail(name, value, f"an integer >= {minimum}{upper}")

    def check_float(self, name: str, *, optional: bool = False, positive: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._fail(name, value, "a finite number" + (" or None" if optional else ""))
        if positive and value <= 0:
            raise self._fail(name, value, "a number > 0")

    def check_bool(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, bool):
            raise self._fail(name, value, "True or False")
