#!/usr/bin/env bash
set -uo pipefail
R=$PWD
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
WHEELS=$R/.gpu bash benchmarks/gpu/delta_rule_check.sh
python3 - <<'PY'
import json, os, glob
d = json.load(open(glob.glob(os.environ["OUT"] + "/delta_*.json")[0]))
for c in d.get("checks", []):
    bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
    print("check", c.get("side"), c.get("method"), "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass"), c.get("error", "")[:200])
for r in d["rows"]:
    for mode in ("fwd", "fwd_bwd"):
        for side, t in r.get(mode, {}).items():
            if isinstance(t, dict):
                print(r["N"], r.get("method"), mode, side, t.get("median_ms"), t.get("error", "")[:150])
PY
