"""The benchmark: speed, memory, fidelity to dense attention and correctness, in one run.

- :mod:`~attnlab.bench.config`: what a run measures (presets for CPU and GPU).
- :mod:`~attnlab.bench.efficiency`: latency, peak memory, TFLOP/s, speedup over dense SDPA, density.
- :mod:`~attnlab.bench.fidelity`: output error and attention-mass recall against dense softmax.
- :mod:`~attnlab.bench.workloads`: random inputs and Q/K/V captured from a real encoder (MiniLM).
- :mod:`~attnlab.bench.store`: the DuckDB results database. :mod:`~attnlab.bench.report`: HTML + PNG.
- :mod:`~attnlab.bench.runner`: one run, end to end.
"""
