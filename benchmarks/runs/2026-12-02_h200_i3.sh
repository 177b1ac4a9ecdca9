#!/usr/bin/env bash
# Session 7 of 2026-12-02, chain I, call 9 (warm, after i2): 1.3b at 128K in bf16, LongNet (fa4) and dense, both
# with the chunked loss's Triton kernels (the default); then LongNet FP8 again (a second sample of its step).
W=/tmp/i3; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTHONUNBUFFERED=1
finish() { tar czf $OUT/i3.tgz -C $W .; echo "i3 done at $((SECONDS-T0)) s"; }
trap finish EXIT
run() {  # run NAME FUSED TIMEOUT bench_train args...
  local name=$1 fused=$2 limit=$3; shift 3
  local L=$(( 590 - (SECONDS - T0) )); (( L < 60 )) && { echo "skip $name"; return; }; (( L > limit )) && L=$limit
  env LONGNET_FUSED_LOSS=$fused timeout $L python3 tools/bench_train.py "$@" --timeout-s $((L - 5)) --out $W/$name > $W/$name.txt 2>&1
  echo "$name (fused loss $fused) rc $? at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/$name.md
}
ARGS="--presets 1.3b --contexts 128K --warmup 1 --steps 2"
run bf16_longnet_fused 1 120 --kinds longnet $ARGS --backend fa4
run bf16_dense_fused 1 150 --kinds dense $ARGS
run fp8_longnet_fused_2 1 110 --kinds longnet $ARGS --fp8 delayed --backend fa4
run fp8_dense_fused_2 1 140 --kinds dense $ARGS --fp8 delayed
