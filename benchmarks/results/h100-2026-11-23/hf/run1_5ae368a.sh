#!/bin/bash
# The GPU run of issue 10's decode/hf follow-up (one command; outputs under $OUT).
set -u
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 80 python -m pytest -x -q tests/test_decode_kernel.py tests/test_decode_page_topk.py > $OUT/pytest_decode_cuda.log 2>&1; tail -2 $OUT/pytest_decode_cuda.log
timeout 110 python benchmarks/decode_bench.py --no-methods --pages 16 --batches 1 8 --reps 20 --out $OUT/decode_bench.json > $OUT/decode_bench.log 2>&1; echo "decode_bench rc $?"; tail -c 600 $OUT/decode_bench.log
D="page_topk:budget=4096 snapkv:budget=4096 h2o:budget=4096 tidal:budget=4096 recycled:budget=4096 tokenselect:budget=4096 retrieval_heads_kv:budget=4096"
timeout 190 python benchmarks/hf_bench.py --layers 8 --contexts 32768 131072 --prefill-reps 5 2 --reps 10 --prefill streaming:window=4096 block_topk --decode $D --unbound page_topk:budget=4096 --out $OUT/hf_bench.json > $OUT/hf_bench.log 2>&1; echo "hf_bench rc $?"; tail -40 $OUT/hf_bench.log
