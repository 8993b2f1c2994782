#!/usr/bin/env bash
# s23 run 5: DELTA_U0_LOWP on by default, checked (1x32x8192, every gradient) and timed (20 repetitions) with it off as
# an A/B side, fla-core KDA (its autotuning capped at 4 configs per kernel), B=8 H=16 too; profile at 32K
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
python3 -m pip install -q --no-index --no-deps --target /tmp/site $R/.gpu/*.whl || exit 1
cd /tmp/c
export PYTHONPATH=/tmp/c:/tmp/site PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 80 python3 -m pytest $P -v -n 4 tests/test_linear_delta_u0_lowp.py tests/test_linear_delta_saved_lowp.py tests/test_linear_scalar_gate_grad.py 2>&1 | tail -40 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
cd benchmarks
AB="DELTA_U0_LOWP=off"
timeout 460 python3 linear_bench.py --methods gated_delta,gated_delta_kda,gla --shapes 1x32x32768,1x32x8192,8x16x8192,8x16x4096 --budget 360 \
  --fla-methods gated_delta_kda --fast-autotune --fla-max-configs 4 --fla-limit 150 \
  --check 1x32x8192:grad --check-ab --check-budget 200 --ab-values "$AB" --reps 20 --profile 1x32x32768 \
  --out $OUT/final_$ATTNLAB_COMMIT.json > $OUT/final.log 2>&1
echo "bench rc $?"
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/final_" + os.environ["ATTNLAB_COMMIT"] + ".json"))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", c.get("why", ""))[:150], {k: v.get("err") for k, v in c.items() if isinstance(v, dict)})
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            if isinstance(t, dict):
                print(r.get("N"), mode, side, t.get("median_ms"), t.get("iqr_ms"), str(t.get("error", ""))[:150])
p = d.get("profile", {})
for m, v in p.items():
    if isinstance(v, dict) and "kernels" in v:
        print("profile", m, v["gpu_ms_per_iter"], [(k["name"][:28], k["ms"]) for k in v["kernels"][:8]])
PY
