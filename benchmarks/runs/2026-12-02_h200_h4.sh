#!/usr/bin/env bash
# Session 6 of 2026-12-02, chain H, call 10 (warm: /tmp/site holds TE + FA4): the megatron-core 0.19.2 smoke run
# (.mc19: train, async checkpoints, resume, SIGTERM requeue, export, sample), its GPU-test step a subset (the
# fifth session's run of the full list was cut by the call's limit).
W=$OUT; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
SMOKE_TESTS="-m gpu tests/attention/test_decode.py tests/attention/test_graphs.py -k cudnn" timeout 400 bash tools/smoke_gpu.sh .mc19/megatron_core-0.19.2-*.whl $W > $W/smoke.txt 2>&1
echo "smoke rc $? at $((SECONDS-T0)) s"; grep -E "^(PASS|FAIL)" $W/smoke_*.log; tail -3 $W/smoke_*.log
