"""Errors of the organisms package; messages say what was given, what was expected and what to do."""

from __future__ import annotations

from attnlab.errors import AttnlabError


class ConfigError(AttnlabError, ValueError):
    """A corpus, tokenizer, task or training setting is out of its range or inconsistent."""


class CheckpointError(AttnlabError, ValueError):
    """A checkpoint folder is missing, incomplete, not a Llama model, or holds pickled weights only."""
