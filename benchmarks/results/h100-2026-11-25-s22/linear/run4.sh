#!/usr/bin/env bash
# s22 run 4: DELTA_BWD_SPLIT_CHANNEL, DELTA_BV=16 (reverse pass), DELTA_H_BV=16 (forward pass) and the session-start settings beside the defaults; profile at 32K
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 150 python3 -m pytest $P -v -n 4 tests/test_linear_delta_bwd_split.py tests/test_linear_delta_saved_lowp.py tests/test_linear_delta_bwd_blocks.py tests/test_linear_delta_bwd_dh.py 2>&1 | tail -60 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
cd benchmarks
AB="DELTA_BWD_SPLIT_CHANNEL=on,DELTA_BV=16,DELTA_H_BV=16,DELTA_BWD_SPLIT=off+DELTA_SAVED_LOWP=off+DELTA_SAVE_SCORES=off"
timeout 400 python3 linear_bench.py --methods gated_delta,gated_delta_kda --shapes 1x32x8192,1x32x32768 --no-fla \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 300 --ab-values "$AB" --reps 10 --profile 1x32x32768 \
  --out $OUT/ab_$ATTNLAB_COMMIT.json > $OUT/ab.log 2>&1
tail -2 $OUT/ab.log | cut -c1-500
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab_" + os.environ["ATTNLAB_COMMIT"] + ".json"))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", c.get("why", "")), {k: v.get("err") for k, v in c.items() if isinstance(v, dict)})
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            if isinstance(t, dict):
                print(r.get("N"), mode, side, t.get("median_ms"), t.get("error", "")[:150])
PY
