"""Run Hugging Face transformers causal LMs on attnlab methods, per layer and per head, prefill and decode.

    import attnlab.hf
    with attnlab.hf.use(model, prefill="streaming", prefill_params={"window": 1024}, decode="softmax"):
        out = model.generate(**inputs, max_new_tokens=64)

    attnlab.hf.register()          # then attn_implementation="attnlab" (softmax unless a plan is given)

KV memory: ``use(..., free_kv=True)`` frees what the eviction methods drop; :func:`kv_memory` reports, per
layer, the cache bytes allocated vs kept vs read (:mod:`attnlab.hf.kv`).

Importing this package registers nothing with transformers (and does not import it): :func:`use` and
:func:`register` are the explicit steps. Plans: :mod:`attnlab.hf.plan`; supported attention classes:
:data:`attnlab.hf.models.SUPPORTED_ATTENTION`.
"""

from attnlab.hf.interface import HFMask, HFRuntimeError, Runtime
from attnlab.hf.kv import LayerKV, kv_memory
from attnlab.hf.models import SUPPORTED_ATTENTION, UnsupportedModelError, inspect_model, tiny_config
from attnlab.hf.plan import Assignment, HFPlan, MethodRef, PlanError, load_plan
from attnlab.hf.use import check_plan, register, unregister, use

__all__ = [
    "SUPPORTED_ATTENTION",
    "Assignment",
    "HFMask",
    "HFPlan",
    "HFRuntimeError",
    "LayerKV",
    "MethodRef",
    "PlanError",
    "Runtime",
    "UnsupportedModelError",
    "check_plan",
    "inspect_model",
    "kv_memory",
    "load_plan",
    "register",
    "tiny_config",
    "unregister",
    "use",
]
