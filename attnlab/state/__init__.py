"""State that methods carry from call to call: cache statistics of decode-time KV selection.

- :mod:`attnlab.state.pages`: per-page key min/max summaries (Quest), updated incrementally as the cache
  grows.
- :mod:`attnlab.state.eviction`: the tokens an eviction policy (SnapKV, H2O) keeps,
  decided once or (per-step H2O) at every call with the scores accumulated so far.
- :mod:`attnlab.state.reuse`: token positions chosen at one step and reused (recycled, tokenselect, tidal).
"""

from attnlab.state.eviction import EvictionState, StepEvictionState
from attnlab.state.pages import PageSummary, summarize
from attnlab.state.reuse import TokenSet

__all__ = ["EvictionState", "PageSummary", "StepEvictionState", "TokenSet", "summarize"]
