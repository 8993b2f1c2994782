#!/usr/bin/env bash
# The gated delta rule (issue 9) on the GPU machine, in one command: the delta / KDA test files on CUDA,
# then one linear_bench run (B=1 H=32 D=128 bf16, 8K and 32K) that checks every side against the fp32
# recurrence at 1x32x8192 (every gradient) and times, interleaved with cuDNN and fla-core (fully tuned,
# from a carried wheel: WHEELS, default .gpu), the defaults beside the switches still off by default
# (DELTA_SAVE_SCORES). Results under $OUT; ATTNLAB_COMMIT names the commit (the device copy has no .git).
#
#   ATTNLAB_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu/delta_rule_check.sh
#
# fla's first KDA calls autotune every config (about 4 minutes at 8K and 32K together): the bench step
# gets most of the 600 s a device command may take.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site ${WHEELS:-.gpu}/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/env.txt"
echo "commit ${ATTNLAB_COMMIT:-unknown}" >> "$OUT/env.txt"
timeout ${TESTS_TIMEOUT:-120} python3 -m pytest $P -v -n 4 tests/test_linear_delta_bwd_dh.py \
  tests/test_linear_delta_save_scores.py tests/test_linear_score_bwd.py 2>&1 | tail -80 > "$OUT/tests.txt"
grep -E "FAILED|passed|failed" "$OUT/tests.txt" | tail -5
cd benchmarks
timeout ${BENCH_TIMEOUT:-430} python3 linear_bench.py --methods gated_delta,gated_delta_kda \
  --shapes 1x32x8192,1x32x32768 --fla-methods gated_delta_kda --fast-autotune --reps 10 \
  --check 1x32x8192:grad --check-ab --check-budget 150 --ab-values "DELTA_SAVE_SCORES=on" \
  --out "$OUT/delta_${ATTNLAB_COMMIT:-unknown}.json" > "$OUT/delta.log" 2>&1
tail -5 "$OUT/delta.log"
