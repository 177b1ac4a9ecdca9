#!/usr/bin/env bash
# Session 6 of 2026-12-02, chain H, call 8 (warm: /tmp/site holds TE + FA4): the sdpa / sdpa-flash / triton GPU
# oracle suite with -v (each test's id and outcome printed as it ends), 6 workers, to name the failure the fifth
# session's cut run showed.
W=$OUT; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
LONGNET_TEST_BACKENDS=sdpa,sdpa-flash,triton timeout 575 python3 -m pytest -v -rf --tb=short -p no:cacheprovider -n 6 tests/attention/test_gpu_backends.py tests/attention/test_fused_triton.py tests/attention/test_triton_backend.py tests/attention/test_decode.py > $W/t_sdpa.log 2>&1
echo "sdpa suite rc $? at $((SECONDS-T0)) s"
echo "passed $(grep -c ' PASSED' $W/t_sdpa.log), skipped $(grep -c ' SKIPPED' $W/t_sdpa.log), failed $(grep -c ' FAILED' $W/t_sdpa.log)"
grep -E " FAILED|^FAILED|^E  " $W/t_sdpa.log | head -30; tail -2 $W/t_sdpa.log
