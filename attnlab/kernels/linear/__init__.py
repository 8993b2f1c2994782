"""Linear and gated-recurrent attention executors: chunked forms (plain PyTorch in ``naive.py``, Triton in
the ``chunk_*.py`` kernels) and a recurrent decode step, with the state carried in and out.

- ``naive.py``: the chunked parallel forms in PyTorch (exact, fp32): the kernels' twins and the CPU path.
- ``limits.py``: what the Triton kernels can take (checked before launch, and by the backend's refusals).
- Triton kernels (no host code): ``fwd.py``, the tile helpers and the recurrent step kernel (decode); the
  chunk-parallel kernels of the gated linear recurrence (GLA; lightning and linear are special cases) and
  of the WY/UT form of the gated delta rule, and their backwards:

  - ``chunk_state.py``: the chunk states (local states and a scan over them, or one sequential pass;
    the delta rule's sequential passes, forward and backward);
  - ``chunk_scores.py``: what both families share: the gate cumsum, the intra-chunk scores and their
    backward, the per-chunk output;
  - ``chunk_gla_bwd.py``: the gated linear recurrence's per-chunk backward;
  - ``chunk_delta_wy.py``: the delta rule's UT transform; ``chunk_delta_bwd.py``: its per-chunk backward
    (``chunk_delta_bwd_split.py``: the scalar-gate one with its products over V in two loops).

- Host side: ``launch.py`` (sizes, dot precisions, checks, gate layouts, launch options);
  ``launch_scores.py``, ``launch_gla.py``, ``launch_delta.py`` (the launchers); ``custom_ops.py`` (the
  chunked forms' ``torch.library`` custom ops, with fake tensors and autograd); ``step_plan.py`` (the
  decode step's launch plan); ``varlen.py`` (packed sequences); ``op.py``: the entry points, the module
  flags (A/B switches, tile sizes) and the namespace the launchers read kernels and flags from.

Import ``attnlab.kernels.linear.op`` lazily: it imports Triton and registers the custom ops.

Conventions of the chunk kernels. Layout: q, k (B*H, N, K), v and o (B*H, N, V), contiguous. ``GC`` holds
the chunk-local inclusive cumsum G of the log-decays, zero-padded to NP = chunks * BT rows: per channel
(GATE == 2: (B*H, NP, K)) or one per token (GATE == 1: (B*H, NP); lightning's per-head decays, linear's
zeros, gated_delta's per-head gate). States (K, V) are float32 (but the chunk-start states of a forward
without a backward, kept in the inputs' 16-bit dtype: ``op.GLA_H_COMPACT``, ``op.DELTA_H_COMPACT``). Every
decay factor is exp of a difference G_i - G_j with i after j, or a product of two such factors split at a
row between i and j (each <= 1): nothing overflows, however strong the decay (no exp(G) / exp(-G) split
across a chunk). G itself stays finite: every log-decay is floored at ``naive.GATE_FLOOR`` (-128, a decay
that is 0 in float32 as any stronger one) before the cumsum (``gate_cumsum_kernel``, ``chunk_cumsum*``,
the naive twins), else float32's min (or a float64 gate out of float32's range) gave -inf - (-inf). Transposes are taken of loaded tiles only, never of a dot's result (Triton 3.4 to 3.7.0
miscompile tl.trans of a Hopper wgmma-layout tensor: fla issue #640).
"""
