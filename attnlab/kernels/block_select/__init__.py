"""Block selection of the pooled-score estimators (``block_topk``): keep the top-k key blocks per query
block, the sink block and the local span (the query block's diagonal) forced, split into full and causal-partial tiles (``naive.py`` the PyTorch
rule, ``fwd.py`` one Triton pass per row of blocks, ``op.py`` the dispatch)."""
