"""The benchmark: speed, memory, fidelity to dense attention and correctness, in one run.

- :mod:`~attnlab.bench.config`: what a run measures (presets for CPU and GPU).
- :mod:`~attnlab.bench.efficiency`: warm everything, then time every row with the dense baseline in
  interleaved rounds (:mod:`~attnlab.bench.timing`), as called and as kernel (:mod:`~attnlab.bench.calls`);
  peak memory (:mod:`~attnlab.bench.memory`), TFLOP/s, speedup, density; parity first
  (:mod:`~attnlab.bench.checks`).
- :mod:`~attnlab.bench.fidelity`: output error (relative to uniform attention) and attention-mass recall
  against dense softmax, on :mod:`~attnlab.bench.workloads` (MiniLM on prose; random), whose attention
  :mod:`~attnlab.bench.attention_stats` tells learned from random.
- :mod:`~attnlab.bench.store`: the DuckDB results database. :mod:`~attnlab.bench.report`: HTML + PNG
  (:mod:`~attnlab.bench.report_tables`, :mod:`~attnlab.bench.plots`).
- :mod:`~attnlab.bench.env`: device, versions, commit and dirty flag. :mod:`~attnlab.bench.runner`: one run.
"""
