#!/usr/bin/env bash
# s21 run 1: the delta rule's backward rewrites on the H100 (tests, check against the fp32 recurrence, A/B timing)
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c && cp -r attnlab/organisms/checkpoints /tmp/c/attnlab/organisms/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1
cd /tmp/c
export PYTHONPATH=/tmp/c:/tmp/site PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider -W ignore::pytest_benchmark.logger.PytestBenchmarkWarning"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 150 python3 -m pytest $P -v tests/test_linear_delta_bwd_dh.py tests/test_linear_delta_bwd_blocks.py tests/test_linear_kda_intra.py tests/test_linear_kernels.py -k "delta or kda or packed or opcheck" 2>&1 | tail -60 > $OUT/tests.txt
tail -3 $OUT/tests.txt
cd benchmarks
AB="DELTA_BWD_DH_V2=on,DELTA_BWD_BVB=32,DELTA_BWD_DH_V2=on+DELTA_BWD_BVB=32,DELTA_BWD_DH_V2=on+DELTA_BWD_BVB=64,DELTA_BWD_DH_V2=on+DELTA_BWD_BVB=32+DELTA_BWD_DH_LOWP=off"
timeout 330 python3 linear_bench.py --methods gated_delta,gated_delta_kda --shapes 1x32x8192,1x32x32768 --no-fla \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 200 --ab-values "$AB" --reps 10 \
  --out $OUT/ab_$ATTNLAB_COMMIT.json > $OUT/ab.log 2>&1
tail -5 $OUT/ab.log
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab_" + os.environ["ATTNLAB_COMMIT"] + ".json"))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", "")[:200])
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            print(r["N"], mode, side, t.get("median_ms"), t.get("error", ""))
PY
timeout 90 python3 - > $OUT/profile.log 2>&1 <<'PY'
import json, os
import linear_bench
from attnlab.kernels.linear import op
op.DELTA_BWD_DH_V2 = True
op.DELTA_BWD_BVB = 32
p = linear_bench.profile(1, 32, 8192, 128, ("gated_delta", "gated_delta_kda"))
json.dump(p, open(os.environ["OUT"] + "/profile_dhv2_bvb32_" + os.environ["ATTNLAB_COMMIT"] + ".json", "w"), indent=1)
print(json.dumps(p)[:6000])
PY
tail -c 1500 $OUT/profile.log
