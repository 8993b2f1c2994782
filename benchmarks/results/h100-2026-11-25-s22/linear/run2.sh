#!/usr/bin/env bash
# s22 run 2: KDA checked with DELTA_SAVE_SCORES on/off; timings without fla; per-kernel profile at 32K
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c/benchmarks
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 500 python3 linear_bench.py --methods gated_delta_kda,gated_delta --shapes 1x32x8192,1x32x32768 --no-fla \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 250 --ab-values "DELTA_SAVE_SCORES=on" --reps 10 \
  --profile 1x32x32768 --out $OUT/kda_$ATTNLAB_COMMIT.json > $OUT/kda.log 2>&1
tail -3 $OUT/kda.log | cut -c1-3000
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/kda_" + os.environ["ATTNLAB_COMMIT"] + ".json"))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", ""), {k: v.get("err") for k, v in c.items() if isinstance(v, dict)})
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            if isinstance(t, dict):
                print(r.get("N"), mode, side, t.get("median_ms"), t.get("error", "")[:150])
PY
