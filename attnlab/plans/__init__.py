"""Sparsity plans: which (query, key) pairs a call computes, as one value.

A :class:`Plan` lists, per (batch or 1, head or 1, query block), the key blocks to visit, split into full
blocks (every pair computed, no mask work) and partial blocks (a token rule decides inside), plus optional
token columns. Static methods make theirs from their mask and shapes (:func:`static_plan`, cached);
dynamic methods will estimate theirs from q and k (never cached). The density, the attention-mass recall,
the dense mask for references and dense fallbacks, the FlexAttention BlockMask and the executors' tables
are all derived from this one value.
"""

from attnlab.plans.plan import Plan, dense_block_count
from attnlab.plans.static import causal_plan, plan_from_mask, static_plan

__all__ = ["Plan", "causal_plan", "dense_block_count", "plan_from_mask", "static_plan"]
