"""``attnlab eval``: what attention methods keep of a causal LM's long-context accuracy, at what density and
perplexity.

For each method and budget (parameter set), each task, each length: ``samples`` generated samples
(:mod:`attnlab.organisms.tasks`, haystack from a held-out corpus), greedy decoding with the prompt's
prefill and the answer's decode steps run by the method (:func:`attnlab.hf.use`), exact match
(:func:`attnlab.eval.tasks.evaluate`). Per run and length also: densities (:mod:`attnlab.eval.density`),
model step times, and held-out prefill/decode perplexity (:mod:`attnlab.eval.perplexity`). Results go to
JSON, DuckDB (:mod:`attnlab.eval.store`) and a report with accuracy-vs-density/speed Pareto plots
(:mod:`attnlab.eval.report`).
"""

from attnlab.eval.tasks import EvalConfig, EvalResult, MethodRun, evaluate, method_runs, runnable_methods

__all__ = ["EvalConfig", "EvalResult", "MethodRun", "evaluate", "method_runs", "runnable_methods"]
