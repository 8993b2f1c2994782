"""Time bench rows (baseline + called + kernel, interleaved) in this process; print medians, minor page
faults per call, and the CPU other processes used meanwhile (in cores). argv: row specs
method:backend:pattern:n:mode ... [--rounds R]"""
import json, os, resource, sys, time
import torch
from attnlab.bench import calls
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.efficiency import Entry
from attnlab.bench.timing import measure_interleaved, paired_ratio
from attnlab.patterns import Pattern
import attnlab

def busy_jiffies():
    f = open("/proc/stat").readline().split()[1:]
    v = list(map(int, f)); return sum(v) - v[3] - v[4]   # minus idle, iowait
def own_jiffies():
    tot = 0
    for t in os.listdir(f"/proc/self/task"):
        try:
            s = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
            tot += int(s[11]) + int(s[12])
        except FileNotFoundError: pass
    return tot
args = sys.argv[1:]
rounds = 1
if "--rounds" in args:
    i = args.index("--rounds"); rounds = int(args[i + 1]); del args[i:i + 2]
shuffle = None
if "--shuffle" in args:
    i = args.index("--shuffle"); shuffle = int(args[i + 1]); del args[i:i + 2]
    import random; random.Random(shuffle).shuffle(args)
cfg = BenchConfig.preset("cpu")
rows = []
for s in args:
    method, backend, pat, n, mode = s.split(":"); n = int(n)
    pattern = Pattern(pat); n_q, n_k = shapes(pattern, n)
    x = calls.Inputs.make(cfg, n_q, n_k, mode == "fwd_bwd")
    params = dict(attnlab.get(method).distinct_bench_params(n)[0])
    base = Entry("softmax", "sdpa:default", {}, peer=True).sides(x, mode, pattern.causal)["called"]
    fns = {"baseline": base, **Entry(method, backend, params).sides(x, mode, pattern.causal)}
    for fn in fns.values():
        for _ in range(2): fn()
    rows.append((s, fns))
out = []
hz = os.sysconf("SC_CLK_TCK")
for r in range(rounds):
    for s, fns in rows:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b0, o0, t0 = busy_jiffies(), own_jiffies(), time.perf_counter()
        t = measure_interleaved(fns, torch.device("cpu"), target_s=cfg.target_s, max_reps=cfg.max_reps)
        dt = time.perf_counter() - t0
        b1, o1 = busy_jiffies(), own_jiffies()
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        calls_n = sum(v.reps for v in t.values()) + len(t) * 3
        out.append({"row": s,
            "base": round(t["baseline"].median_ms, 2), "called": round(t["called"].median_ms, 2),
            "kernel": round(t["kernel"].median_ms, 2), "called_min": round(t["called"].min_ms, 2),
            "speedup": round(t["baseline"].median_ms / t["called"].median_ms, 3),
            "paired": round(paired_ratio(t["baseline"], t["called"]), 3), "reps": t["called"].reps,
            "flt/call": round((f1 - f0) / calls_n), "s": round(dt, 1),
            "own_cores": round((o1 - o0) / hz / dt, 2), "foreign_cores": round(((b1 - b0) - (o1 - o0)) / hz / dt, 2)})
print(json.dumps({"pid": os.getpid(), "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC", "GLIBC", "THP", "OMP", "TORCHINDUCTOR"))}}))
for o in out: print(json.dumps(o))
