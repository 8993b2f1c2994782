#!/usr/bin/env bash
# One GPU session on the lent H100: install carried wheels, record the environment, then run the steps
# named as arguments (kernel | probe | tune | tests | verify | bench | fidelity | hotpath | graph | bsbench). Results go under $OUT. Pass the commit with
# `git describe --always --dirty > ATTNLAB_COMMIT` before the call and carry that file (the device copy of the tree has no .git); WHEELS names the
# carried wheel folder (default .whl; .whl-gpu leaves out matplotlib's family to fit the 64 MiB carry: bench --no-report).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
  || exit 1
export PYTHONPATH="$PWD:/tmp/site"
export PATH="/tmp/site/bin:$PATH"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "commit ${ATTNLAB_COMMIT:-$(cat ATTNLAB_COMMIT 2>/dev/null || echo unknown)}"; } | tee "$OUT/env.txt"
for step in "$@"; do
  case "$step" in
    kernel) timeout ${KERNEL_TIMEOUT:-400} python3 benchmarks/sigmoid_kernel.py --out "$OUT/sigmoid_kernel.json" 2>&1 | tee "$OUT/sigmoid_kernel.log" ;;
    tests) timeout ${TESTS_TIMEOUT:-560} python3 -m pytest ${PYTEST_ARGS:-tests} -n 4 -v -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/pytest_cuda.log" | grep -E "FAILED|Error|passed|failed" | tail -40 ;;
    probe) timeout ${PROBE_TIMEOUT:-500} python3 benchmarks/sigmoid_probe.py --out "$OUT/sigmoid_probe.json" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/sigmoid_probe.log" | grep -E "^  n=|rror" ;;
    tune) timeout ${TUNE_TIMEOUT:-300} python3 benchmarks/sigmoid_tuning.py --out "$OUT/sigmoid_tuning.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/sigmoid_tuning.log" | grep -v "^    .*ratio" ;;
    verify) timeout ${VERIFY_TIMEOUT:-300} python3 -m attnlab verify --device cuda --jobs ${VERIFY_JOBS:-6} --out "$OUT/verify_cuda.jsonl" 2>&1 | tee "$OUT/verify_cuda.log" | tail -40 ;;
    bench) timeout ${BENCH_TIMEOUT:-560} python3 -m attnlab bench --device cuda --out "$OUT/${BENCH_OUT:-bench}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/${BENCH_OUT:-bench}.log" | tail -30 ;;
    fidelity) timeout ${FIDELITY_TIMEOUT:-200} python3 -m attnlab bench --device cuda --no-efficiency --workloads random --out "$OUT/bench-fidelity" 2>&1 | tee "$OUT/bench-fidelity.log" | tail -30 ;;
    hotpath) timeout ${HOTPATH_TIMEOUT:-500} python3 benchmarks/hotpath.py --out "$OUT/hotpath" ${HOTPATH_ARGS:-} 2>&1 | tee "$OUT/hotpath.log" | tail -40 ;;
    graph) timeout ${GRAPH_TIMEOUT:-300} python3 -m pytest tests/test_cuda_graph.py -v -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/pytest_cuda_graph.log" | tail -15 ;;
    bsbench) timeout ${BSBENCH_TIMEOUT:-540} python3 benchmarks/block_sparse_bench.py --out "$OUT/block_sparse" ${BSBENCH_ARGS:-} 2>&1 | tee "$OUT/block_sparse.log" | tail -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
