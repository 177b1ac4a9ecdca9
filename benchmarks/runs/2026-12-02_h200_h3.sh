#!/usr/bin/env bash
# Session 6 of 2026-12-02, chain H, call 9 (warm: /tmp/site holds TE + FA4 + megatron-core 0.16.1): FP8 loss
# parity of the tensorwise and blockwise recipes against bf16 (125m, L = 32K, 200 steps, sdpa attention; the
# fourth session's delayed run's settings).
W=$OUT; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
timeout 330 python3 tools/bench_fp8.py --recipes tensorwise,blockwise --seq-length 32768 --global-batch 1 --steps 200 --backend sdpa --workdir /tmp/h3/fp8work --out $W/fp8_parity > $W/fp8_parity.txt 2>&1
echo "parity rc $? at $((SECONDS-T0)) s"; grep -v -i warn $W/fp8_parity.txt | tail -6
for f in /tmp/h3/fp8work/*/metrics.jsonl; do mkdir -p $W/metrics/$(basename $(dirname $f)); cp $f $W/metrics/$(basename $(dirname $f))/; done 2>/dev/null
