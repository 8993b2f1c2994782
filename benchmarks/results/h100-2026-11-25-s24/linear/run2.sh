#!/usr/bin/env bash
# s24 run 2: where gla_bwd_sliced_kernel's illegal memory access comes from (one process per case); KDA's
# dh_v2_channel at 1 stage against the recurrence
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
for shape in 1x1x64x128 1x1x128x128 1x2x256x64 1x32x8192x128; do
  for cfg in 32,1,0,4 16,0,0,4 32,0,0,8; do
    CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 $R/.gpu/slcmp.py $shape $cfg 2>&1 | grep -E "ok|Error|error" | head -2 | cut -c1-250 | sed "s/^/$shape $cfg: /"
  done
done 2>&1 | tee $OUT/slcmp.log
CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 $R/.gpu/slcmp.py 1x2x256x128 32,1,0,4 float32 2>&1 | grep -E "ok|Error" | head -2 | cut -c1-250 | tee -a $OUT/slcmp.log
cd benchmarks
timeout 200 python3 - > $OUT/kda_s1.log 2>&1 <<'PY'
import json, linear_gpu_check as C
from attnlab.kernels.linear import op
for label, over in (("s1", {"delta_bwd_dh_v2_channel": {"num_stages": 1}}), ("s1 again", {"delta_bwd_dh_v2_channel": {"num_stages": 1}})):
    op.LAUNCH_OVERRIDES.clear(); op.LAUNCH_OVERRIDES.update(over)
    rows = C.check("gated_delta_kda", 1, 32, 8192, 128, grad=True, sides=("attnlab",))
    print(label, json.dumps({k: (v.get("err"), v.get("pass")) for r in rows for k, v in r.items() if isinstance(v, dict)}), flush=True)
PY
tail -3 $OUT/kda_s1.log | cut -c1-400
