#!/usr/bin/env bash
# s23 run 1: DELTA_U0_LOWP on CUDA (tests, checked at 1x32x8192 every gradient, timed beside the defaults),
# the wall-vs-kernel timeline at 1x32x32768, and a sweep of the delta kernels' launch variants at 32K
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
T0=$(date +%s)
timeout 100 python3 -m pytest $P -v -n 4 tests/test_linear_delta_u0_lowp.py tests/test_linear_delta_saved_lowp.py 2>&1 | tail -30 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
cd benchmarks
timeout 90 python3 linear_timeline.py --shape 1x32x32768 --methods gated_delta --out $OUT/timeline_$ATTNLAB_COMMIT.json > $OUT/timeline.log 2>&1
echo "timeline rc $? at $(( $(date +%s) - T0 )) s"
timeout 270 python3 linear_bench.py --methods gated_delta,gated_delta_kda --shapes 1x32x8192,1x32x32768 --no-fla \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 110 \
  --ab-values "DELTA_U0_LOWP=on" --reps 10 --profile 1x32x32768 \
  --out $OUT/u0_$ATTNLAB_COMMIT.json > $OUT/u0.log 2>&1
echo "bench rc $? at $(( $(date +%s) - T0 )) s"
LEFT=$(( 560 - ($(date +%s) - T0) ))
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
        print("timeline", side, "b2b", v["event_ms_back_to_back_median"], "spin", v["event_ms_spin_ahead_median"])
        for it in v["iterations"]:
            print("  ", {k: it[k] for k in ("event_ms", "busy_ms", "span_ms", "lead_ms", "idle_ms", "host_ms", "kernels")}, it["gaps"][:4])
except Exception as e:
    print("timeline", e)
try:
    d = json.load(open(f"{o}/u0_{c_}.json"))
    for c in d.get("checks", []):
        bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
        print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), str(c.get("error", c.get("why", "")))[:150], {k: v.get("err") for k, v in c.items() if isinstance(v, dict)})
    for r in d["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            for side, t in r.get(mode, {}).items():
                if isinstance(t, dict):
                    print(r.get("N"), mode, side, t.get("median_ms"), t.get("iqr_ms"), str(t.get("error", ""))[:150])
    p = d.get("profile", {})
    for m, v in p.items():
        if isinstance(v, dict) and "kernels" in v:
            print("profile", m, v["gpu_ms_per_iter"], [(k["name"][:28], k["ms"]) for k in v["kernels"][:8]])
except Exception as e:
    print("bench", e)
try:
    s = json.load(open(f"{o}/sweep_{c_}.json")).get("sweep", {})
    for m, rows in s.items():
        if isinstance(rows, list):
            for r in rows:
                print("sweep", m, r.get("variant"), r.get("variant_over_default"), r.get("max_rel_diff_vs_default"), (r.get("default") or {}).get("median_ms"), (r.get("variant_t") or {}).get("median_ms"), r.get("error", r.get("skipped", "")))
except Exception as e:
    print("sweep", e)
PY
