"""``attnlab eval``: long-context task accuracy of a causal LM with its attention run by attnlab methods.

For each method and budget (parameter set), each task, each length: ``samples`` generated samples
(:mod:`attnlab.organisms.tasks`, haystack from a held-out corpus), greedy decoding with the prompt's
prefill and the answer's decode steps run by the method (:func:`attnlab.hf.use`), exact match. See
:func:`attnlab.eval.tasks.evaluate`.
"""

from attnlab.eval.tasks import EvalConfig, EvalResult, MethodRun, evaluate, method_runs

__all__ = ["EvalConfig", "EvalResult", "MethodRun", "evaluate", "method_runs"]
