#!/usr/bin/env bash
# s24 run 3: each gla_bwd_sliced_kernel variant against the default backward at 1x32x32768 in a process of its
# own (an illegal access poisons a process); the variants that pass swept (timed against the default)
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 100 python3 -m pytest $P -q -n 4 tests/test_linear_gla_backward.py tests/test_linear_delta_h_kg.py tests/test_linear_delta_stages.py 2>&1 | tail -15 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
ONLY=""
for cfg in 32,0,0,8 16,0,0,8 16,1,0,8 32,1,0,8 16,0,0,4 32,0,0,4 16,1,0,4 16,1,1,8; do
  IFS=, read bks joint unroll w <<< "$cfg"
  label="sliced $bks $([ $joint = 1 ] && echo joint || echo sep)$([ $unroll = 1 ] && echo ' unroll') w$w"
  line=$(CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 $R/.gpu/slcmp.py 1x32x32768x128 $cfg 2>&1 | grep -E "ok$|Error" | head -1 | cut -c1-200)
  echo "$label: $line" | tee -a $OUT/slcmp.log
  case "$line" in *ok) ONLY="$ONLY,$label";; esac
done
echo "sweep only: $ONLY"
cd benchmarks
timeout 200 python3 linear_bench.py --methods gla --shapes "" --no-fla --sweep 1x32x32768 --sweep-budget 170 \
  --sweep-only "${ONLY#,}" --out $OUT/sweep_$ATTNLAB_COMMIT.json > $OUT/sweep.log 2>&1
echo "sweep rc $?"
python3 gpu/linear_run_summary.py $OUT/sweep_$ATTNLAB_COMMIT.json
