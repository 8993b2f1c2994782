"""The benchmark: speed, memory, fidelity to dense attention and correctness, in one run.

- :mod:`~attnlab.bench.config`: what a run measures (presets for CPU and GPU); :mod:`~attnlab.bench.planning`:
  the rows it times (dense peers, the control row, every method's budgets) and their densities.
- :mod:`~attnlab.bench.efficiency`: warm everything, then time every row with the dense baseline in
  interleaved rounds (:mod:`~attnlab.bench.timing`), as called and as kernel (:mod:`~attnlab.bench.calls`);
  peak memory (:mod:`~attnlab.bench.memory`); a row's columns and trust flags
  (:mod:`~attnlab.bench.row_columns`); parity first (:mod:`~attnlab.bench.checks`).
- :mod:`~attnlab.bench.fidelity`: output error (relative to uniform attention) and attention-mass recall
  against dense softmax, on :mod:`~attnlab.bench.workloads` (MiniLM on prose; random), whose attention
  :mod:`~attnlab.bench.attention_stats` tells learned from random.
- :mod:`~attnlab.bench.store`: the DuckDB results database. :mod:`~attnlab.bench.report`: HTML + PNG
  (:mod:`~attnlab.bench.report_tables`, :mod:`~attnlab.bench.plots`).
- :mod:`~attnlab.bench.env`: device, versions, commit and dirty flag. :mod:`~attnlab.bench.runner`: one run.
- :mod:`~attnlab.bench.sources` (runs merged from several databases, named per table or cell) and
  :mod:`~attnlab.bench.compare` (two runs' speedups row by row), for benchmarks/summarize.py.
"""
