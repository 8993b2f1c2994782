"""State that methods carry from call to call: cache statistics of decode-time KV selection.

- :mod:`attnlab.state.pages`: per-page key min/max summaries (Quest), updated incrementally as the cache
  grows.
"""

from attnlab.state.pages import PageSummary, summarize

__all__ = ["PageSummary", "summarize"]
