#!/usr/bin/env bash
# s23 run 2: the wall-vs-kernel timeline right after cuDNN's call (the benchmark's order) for gated_delta, KDA
# and gla at 1x32x32768, host time with and without the gate checks; the launch-variant sweep with a lead call
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c/benchmarks
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 200 python3 linear_timeline.py --shape 1x32x32768 --methods gated_delta,gated_delta_kda,gla --after cudnn_sdpa \
  --out $OUT/timeline_$ATTNLAB_COMMIT.json > $OUT/timeline.log 2>&1
echo "timeline rc $? at $(( $(date +%s) - T0 )) s"
LEFT=$(( 540 - ($(date +%s) - T0) ))
timeout $LEFT python3 linear_bench.py --methods gated_delta,gated_delta_kda --shapes "" --no-fla \
  --sweep 1x32x32768 --sweep-budget $(( LEFT - 40 )) --out $OUT/sweep_$ATTNLAB_COMMIT.json > $OUT/sweep.log 2>&1
echo "sweep rc $? at $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
import json, os
c_ = os.environ["ATTNLAB_COMMIT"]
o = os.environ["OUT"]
try:
    t = json.load(open(f"{o}/timeline_{c_}.json"))
    for side, v in t["sides"].items():
        print("timeline", side, {k: v[k] for k in v if k not in ("iterations",)})
        for it in v["iterations"]:
            print("  ", {k: it[k] for k in ("event_ms", "busy_ms", "span_ms", "lead_ms", "idle_ms", "host_ms", "kernels")}, it["gaps"][:5])
except Exception as e:
    print("timeline", e)
try:
    s = json.load(open(f"{o}/sweep_{c_}.json")).get("sweep", {})
    for m, rows in s.items():
        if isinstance(rows, list):
            for r in rows:
                print("sweep", m, r.get("variant"), r.get("variant_over_default"), r.get("max_rel_diff_vs_default"), (r.get("default") or {}).get("median_ms"), (r.get("default") or {}).get("iqr_ms"), (r.get("variant_t") or {}).get("median_ms"), (r.get("variant_t") or {}).get("iqr_ms"), r.get("error", r.get("skipped", "")))
except Exception as e:
    print("sweep", e)
PY
