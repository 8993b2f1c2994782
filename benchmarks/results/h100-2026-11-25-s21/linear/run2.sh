#!/usr/bin/env bash
# s21 run 2: DELTA_BWD_TRANS and DELTA_SCORE_BWD_V2 checked and timed beside the defaults and s20's backward
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider -W ignore::pytest_benchmark.logger.PytestBenchmarkWarning"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 100 python3 -m pytest $P -v tests/test_linear_delta_bwd_dh.py tests/test_linear_delta_bwd_blocks.py tests/test_linear_score_bwd.py 2>&1 | tail -70 > $OUT/tests.txt
grep -c PASSED $OUT/tests.txt; grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
cd benchmarks
AB="DELTA_BWD_TRANS=on,DELTA_SCORE_BWD_V2=on,DELTA_BWD_TRANS=on+DELTA_SCORE_BWD_V2=on,DELTA_BWD_DH_V2=off+DELTA_BWD_BVB=0+DELTA_SKIP_ZERO_GRADS=off"
timeout 220 python3 linear_bench.py --methods gated_delta,gated_delta_kda --shapes 1x32x8192,1x32x32768 --no-fla \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 150 --ab-values "$AB" --reps 10 \
  --out $OUT/ab_$ATTNLAB_COMMIT.json > $OUT/ab.log 2>&1
tail -3 $OUT/ab.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab_" + os.environ["ATTNLAB_COMMIT"] + ".json"))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", "")[:200])
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            if isinstance(t, dict):
                print(r["N"], mode, side, t.get("median_ms"), t.get("error", ""))
PY
