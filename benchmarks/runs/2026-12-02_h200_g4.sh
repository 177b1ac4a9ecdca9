#!/usr/bin/env bash
# Session 5 of 2026-12-02, chain G, call 10 (a fresh machine; carry .whl): the sdpa / sdpa-flash / triton GPU
# oracle suite again, stopping at the first failure (call 9's run showed one 'F' before its limit), and the
# merge kernels' tests with the fixture fix.
W=$OUT; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
source .whl/gpu-install.sh > $W/install.txt 2>&1 || { tail -20 $W/install.txt; exit 1; }
timeout 40 python3 -m pytest -q -rs -p no:cacheprovider tests/attention/test_merge.py tests/attention/test_deferred_merge.py tests/attention/test_grad_add.py > $W/t_kernels.log 2>&1; echo "kernels rc $? at $((SECONDS-T0)) s"; tail -2 $W/t_kernels.log
LONGNET_TEST_BACKENDS=sdpa,sdpa-flash,triton timeout 150 python3 -m pytest -q -x -rf --tb=short -p no:cacheprovider -n 4 tests/attention/test_gpu_backends.py tests/attention/test_fused_triton.py tests/attention/test_triton_backend.py tests/attention/test_decode.py > $W/t_sdpa_x.log 2>&1; echo "sdpa -x rc $? at $((SECONDS-T0)) s"; grep -E "^(FAILED|E |ERROR)|Error|passed|failed" $W/t_sdpa_x.log | head -30
