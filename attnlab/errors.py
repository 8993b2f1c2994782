"""The exceptions attnlab raises. Every message says what was given, what was expected and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnlabError(Exception):
    """Base class of every error attnlab raises on purpose."""


class InputError(AttnlabError, ValueError):
    """q, k or v do not fit together (rank, shapes, dtype, device, values)."""


class UnknownMethodError(AttnlabError, ValueError):
    """No registered method has this name."""


class ParamError(AttnlabError, ValueError):
    """A method parameter is unknown or out of its range."""


class UnsupportedPatternError(AttnlabError, ValueError):
    """The method does not define this attention pattern (e.g. causal cross-attention)."""


class BackendError(AttnlabError, RuntimeError):
    """No backend can run this call, or the forced one refuses; the message lists every refusal."""


class DenseTooLargeError(BackendError):
    """A dense path would materialise an N x N tensor above the configured limit."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
