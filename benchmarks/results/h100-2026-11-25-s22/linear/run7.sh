#!/usr/bin/env bash
# s22 run 7: the linear family's test files on CUDA at the session's final defaults
set -uo pipefail
mkdir -p /tmp/c && tar -xzf .gpu/snap.tar.gz -C /tmp/c
cd /tmp/c
export PYTHONPATH=/tmp/c PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
echo "commit $ATTNLAB_COMMIT" >> $OUT/env.txt
timeout -s INT 480 python3 -m pytest -p no:randomly -p no:cacheprovider -q -n 6 --tb=short \
  tests/test_linear_delta_bwd_split.py tests/test_linear_delta_saved_lowp.py tests/test_linear_gla_saved_lowp.py \
  tests/test_linear_scalar_gate_grad.py tests/test_linear_varlen_api.py tests/test_linear_methods.py \
  tests/test_linear_kernels.py tests/test_linear_delta_save_scores.py tests/test_linear_gla_backward.py \
  tests/test_linear_delta_bwd_blocks.py tests/test_linear_delta_bwd_dh.py 2>&1 | tail -60 > $OUT/tests_cuda.txt
echo "rc $?"; grep -E "FAILED|ERROR|passed|failed" $OUT/tests_cuda.txt | tail -15
