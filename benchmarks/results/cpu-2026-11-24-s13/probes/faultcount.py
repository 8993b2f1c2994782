import sys, resource, random, json, torch, attnlab
from attnlab.bench import calls
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.efficiency import Entry
from attnlab.patterns import Pattern
cfg = BenchConfig.preset("cpu")
specs = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(specs)
out = {}
for s in specs:
    method, backend, pat, n, mode = s.split(":"); n = int(n)
    pattern = Pattern(pat); n_q, n_k = shapes(pattern, n)
    x = calls.Inputs.make(cfg, n_q, n_k, mode == "fwd_bwd")
    params = dict(attnlab.get(method).distinct_bench_params(n)[0])
    fns = {"baseline": Entry("softmax", "sdpa:default", {}, peer=True).sides(x, mode, pattern.causal)["called"], **Entry(method, backend, params).sides(x, mode, pattern.causal)}
    for fn in fns.values(): fn(); fn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        for fn in fns.values(): fn()
    out[s] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 3
print(json.dumps(out))
