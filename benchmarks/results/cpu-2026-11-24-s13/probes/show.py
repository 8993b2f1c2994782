import json, sys, collections
rows = collections.defaultdict(list)
proc = 0
for l in open(sys.argv[1]):
    tag, js = l.split(" ", 1); d = json.loads(js)
    if "pid" in d: proc += 1; continue
    rows[(d["row"], tag)].append((proc, d))
thr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
for (row, tag), L in sorted(rows.items()):
    q = [(p, d) for p, d in L if d["foreign_cores"] <= thr]
    sp = [d["speedup"] for p, d in q]
    s = " ".join(f"p{p}:{d['speedup']:.3f}/{d['flt/call']}" for p, d in q)
    rng = f"{max(sp)/min(sp):.2f}" if sp else "-"
    print(f"{row[:38]:38s} {tag} quiet {len(q)}/{len(L)} max/min {rng}  {s}")
