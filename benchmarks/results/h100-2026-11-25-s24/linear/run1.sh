#!/usr/bin/env bash
# s24 run 1: gla's sliced backward (GLA_BWD_SLICED) swept at 1x32x32768; KDA's dh_v2_channel at 1 stage
# against the recurrence (s23's anomaly); KDA with DELTA_H_KG as an A/B side against fla-core's KDA
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
python3 -m pip install -q --no-index --no-deps --target /tmp/site $R/.gpu/*.whl || exit 1
cd /tmp/c
export PYTHONPATH=/tmp/c:/tmp/site PYTHONUNBUFFERED=1
P="-p no:randomly -p no:cacheprovider"
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout 100 python3 -m pytest $P -q -n 4 tests/test_linear_gla_backward.py tests/test_linear_delta_h_kg.py 2>&1 | tail -15 > $OUT/tests.txt
grep -E "FAILED|passed|failed" $OUT/tests.txt | tail -5
cd benchmarks
timeout 200 python3 linear_bench.py --methods gla --shapes "" --no-fla \
  --sweep 1x32x32768 --sweep-budget 170 --out $OUT/sweep_$ATTNLAB_COMMIT.json > $OUT/sweep.log 2>&1
echo "sweep rc $?"
python3 gpu/linear_run_summary.py $OUT/sweep_$ATTNLAB_COMMIT.json
timeout 90 python3 - > $OUT/kda_s1.log 2>&1 <<'PY'
import json, linear_gpu_check as C
from attnlab.kernels.linear import op
res = {}
for label, over in (("default", {}), ("s1", {"delta_bwd_dh_v2_channel": {"num_stages": 1}}),
                    ("s1 again", {"delta_bwd_dh_v2_channel": {"num_stages": 1}}), ("s2", {"delta_bwd_dh_v2_channel": {"num_stages": 2}})):
    op.LAUNCH_OVERRIDES.clear(); op.LAUNCH_OVERRIDES.update(over)
    rows = C.check("gated_delta_kda", 1, 32, 8192, 128, grad=True, sides=("attnlab",))
    res[label] = rows
    print(label, json.dumps({k: (v.get("err"), v.get("pass")) for r in rows for k, v in r.items() if isinstance(v, dict)}), flush=True)
op.LAUNCH_OVERRIDES.clear()
PY
tail -5 $OUT/kda_s1.log
timeout 300 python3 linear_bench.py --methods gated_delta_kda --shapes 1x32x32768,1x32x8192 --budget 230 \
  --fla-methods gated_delta_kda --fast-autotune --fla-max-configs 4 --fla-limit 150 \
  --check 1x32x8192:grad --check-ab --check-no-fla --check-budget 60 --ab-values "DELTA_H_KG=on" --reps 12 \
  --out $OUT/kg_$ATTNLAB_COMMIT.json > $OUT/kg.log 2>&1
echo "kg rc $?"
python3 gpu/linear_run_summary.py $OUT/kg_$ATTNLAB_COMMIT.json
