#!/usr/bin/env bash
# s23 run 4: launch-variant sweep of gated_delta's sequential passes (value-block widths, 4 stages) at 1x32x32768
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c/benchmarks
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
timeout 200 python3 linear_bench.py --methods gated_delta --shapes "" --no-fla \
  --sweep 1x32x32768 --sweep-budget 160 --out $OUT/sweep_$ATTNLAB_COMMIT.json > $OUT/sweep.log 2>&1
echo "sweep rc $?"
python3 - <<'PY'
import json, os
s = json.load(open(os.environ["OUT"] + "/sweep_" + os.environ["ATTNLAB_COMMIT"] + ".json")).get("sweep", {})
for m, rows in s.items():
    if isinstance(rows, list):
        for r in rows:
            print("sweep", m, r.get("variant"), r.get("variant_over_default"), r.get("max_rel_diff_vs_default"), (r.get("default") or {}).get("median_ms"), (r.get("default") or {}).get("iqr_ms"), (r.get("variant_t") or {}).get("median_ms"), (r.get("variant_t") or {}).get("iqr_ms"), r.get("error", r.get("skipped", "")))
PY
