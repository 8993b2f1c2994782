"""Print the gist of a ``linear_bench.py`` / ``linear_timeline.py`` JSON: checks (pass / fail and errors),
median times with IQR per shape, mode and side, per-kernel profile, sweep ratios, timeline iterations. The
device run scripts (``benchmarks/results/*/linear/run*.sh``) end with it, so the command's output shows the
results before they are fetched.

    python benchmarks/gpu/linear_run_summary.py $OUT/final_<commit>.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any


def lines(d: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for c in d.get("checks", []):
        bad = [k for k, v in c.items() if isinstance(v, dict) and v.get("pass") is False]
        state = "error" if "error" in c else ("FAIL " + str(bad) if bad else "pass")
        errs = {k: v.get("err") for k, v in c.items() if isinstance(v, dict)}
        out.append(
            f"check {c.get('side')} {c.get('method')} {state} {str(c.get('error', c.get('why', '')))[:150]} {errs}"
        )
    for r in d.get("rows", []):
        for mode in ("fwd", "fwd_bwd"):
            for side, t in r.get(mode, {}).items():
                if isinstance(t, dict) and "median_ms" in t:
                    out.append(
                        f"{r.get('B')}x{r.get('H')}x{r.get('N')} {mode} {side} {t['median_ms']} ({t.get('iqr_ms')})"
                    )
                elif isinstance(t, str):
                    out.append(f"{r.get('B')}x{r.get('H')}x{r.get('N')} {mode} {side} {t[:150]}")
    for m, v in (d.get("profile") or {}).items():
        if isinstance(v, dict) and "kernels" in v:
            out.append(
                f"profile {m} {v['gpu_ms_per_iter']} {[(k['name'][:28], k['ms']) for k in v['kernels'][:8]]}"
            )
    for m, rows in (d.get("sweep") or {}).items():
        for r in rows if isinstance(rows, list) else []:
            t, dflt = r.get("variant_t") or {}, r.get("default") or {}
            out.append(f"sweep {m} {r.get('variant')} {r.get('variant_over_default')} diff {r.get('max_rel_diff_vs_default')} "
                       f"{dflt.get('median_ms')} -> {t.get('median_ms')} {r.get('error', r.get('skipped', ''))}")  # fmt: skip
    for side, v in (d.get("sides") or {}).items():
        out.append(f"timeline {side} { ({k: x for k, x in v.items() if k != 'iterations'}) }")
        for it in v.get("iterations", []):
            keys = ("event_ms", "busy_ms", "idle_ms", "host_ms", "kernels")
            out.append(f"   { ({k: it.get(k) for k in keys}) } {it.get('gaps', [])[:3]}")
    return out


def main() -> None:
    for path in sys.argv[1:]:
        try:
            with open(path) as f:
                print("\n".join(lines(json.load(f))))
        except (OSError, ValueError) as e:
            print(f"{path}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
