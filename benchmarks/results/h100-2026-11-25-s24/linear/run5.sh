#!/usr/bin/env bash
# s24 run 5: gla_bwd_sliced_kernel schedules (slices per program, stages, warps) each against the fused kernel in
# a process of its own, the ones that pass swept against the default at 1x32x32768
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
ONLY=""
for cfg in 16,1,4,3,2 16,1,4,3,4 16,1,4,3,8 16,1,4,2,2 16,1,8,3,2 16,1,4,1,1 16,1,4,2,1; do
  IFS=, read bks joint w st spp <<< "$cfg"
  label="sliced $bks $([ $joint = 1 ] && echo joint || echo sep) w$w s$st x$spp"
  out=$(CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 $R/.gpu/slvar.py $cfg 2>&1 | grep -E "ok$|DIFF|Error" | cut -c1-200)
  echo "$out" | sed "s/^/$label: /" | tee -a $OUT/slvar.log
  [ "$(echo "$out" | grep -c 'ok$')" = 3 ] && ONLY="$ONLY,$label"
done
echo "sweep only: $ONLY"
cd benchmarks
timeout 200 python3 linear_bench.py --methods gla --shapes "" --no-fla --sweep 1x32x32768 --sweep-budget 170 \
  --sweep-only "${ONLY#,}" --out $OUT/sweep_$ATTNLAB_COMMIT.json > $OUT/sweep.log 2>&1
echo "sweep rc $?"
python3 gpu/linear_run_summary.py $OUT/sweep_$ATTNLAB_COMMIT.json
