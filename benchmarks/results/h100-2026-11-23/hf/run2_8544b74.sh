#!/bin/bash
# The second GPU run of issue 10's decode/hf follow-up (one command; outputs under $OUT).
set -u
timeout 70 python -m pytest -x -q tests/test_decode_kernel.py tests/test_decode_page_topk.py > $OUT/pytest_decode_cuda.log 2>&1; tail -2 $OUT/pytest_decode_cuda.log
timeout 110 python benchmarks/decode_bench.py --no-methods --pages 16 --batches 1 8 --reps 20 --out $OUT/decode_bench.json > $OUT/decode_bench.log 2>&1; echo "decode_bench rc $?"
python -c "
import json; d=json.load(open('$OUT/decode_bench.json'))
for r in d['page_topk']: print(r['batch'], r['step_path'], r['speedup_vs_best_dense_median'], {k: v['median_us'] for k, v in r['times'].items()})
print(d['failed_sides'])"
P="--layers 8 --reps 10 --prefill --decode page_topk:budget=4096"
timeout 75 python benchmarks/hf_bench.py $P --contexts 32768 131072 --no-prefill-at 32768 131072 --unbound page_topk:budget=4096 --profile $OUT/prof --out $OUT/hf_b1.json > $OUT/hf_b1.log 2>&1; echo "hf b1 rc $?"; tail -8 $OUT/hf_b1.log
timeout 60 python benchmarks/hf_bench.py $P snapkv:budget=4096 --batch 8 --contexts 32768 --no-prefill-at 32768 --out $OUT/hf_b8.json > $OUT/hf_b8.log 2>&1; echo "hf b8 rc $?"; tail -5 $OUT/hf_b8.log
