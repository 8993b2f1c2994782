#!/usr/bin/env bash
# s24 run 6: gla's sliced backward at 8 slices per program (the default): GPU tests, the default against the fused kernel
# over dtypes / shapes / both gate paths, then the figures of record: gla, gated_delta, KDA against cuDNN and
# fla-core (KDA, gla; autotuning capped at 4 configs per kernel), every gradient checked at 1x32x8192 first,
# one slice per program as the A/B side, 15 repetitions; profile at 1x32x32768
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
python3 -m pip install -q --no-index --no-deps --target /tmp/site $R/.gpu/*.whl || exit 1
cd /tmp/c
export PYTHONPATH=/tmp/c:/tmp/site PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 90 python3 -m pytest $P -q -n 4 tests/test_linear_gla_backward.py tests/test_linear_gla_saved_lowp.py tests/test_linear_delta_stages.py 2>&1 | tail -15 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
timeout 80 python3 $R/.gpu/slver.py bfloat16 1x32x8192x128 8x16x4096x128 1x4x1000x128 2>&1 | grep -E "ok$|DIFF|Error" | tee $OUT/verify.log
timeout 60 python3 $R/.gpu/slver.py float16 1x4x1000x128 2>&1 | grep -E "ok$|DIFF|Error" | tee -a $OUT/verify.log
cd benchmarks
timeout 400 python3 linear_bench.py --methods gla,gated_delta,gated_delta_kda --shapes 1x32x32768,1x32x8192,8x16x8192 --budget 300 \
  --fla-methods gated_delta_kda,gla --fast-autotune --fla-max-configs 4 --fla-limit 150 \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 120 --ab-values "GLA_BWD_SLICED_SPP=1" --reps 15 --profile 1x32x32768 \
  --out $OUT/final_$ATTNLAB_COMMIT.json > $OUT/final.log 2>&1
echo "bench rc $?"
python3 gpu/linear_run_summary.py $OUT/final_$ATTNLAB_COMMIT.json
