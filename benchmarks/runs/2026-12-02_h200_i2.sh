#!/usr/bin/env bash
# Session 7 of 2026-12-02, chain I, call 8 (warm, after i1): 1.3b at 128K with FP8 (delayed), LongNet (fa4) and
# dense (TE cuDNN), each with the chunked loss's Triton kernels (LONGNET_FUSED_LOSS=1, the default) and
# without (=0, the PyTorch path of earlier sessions), in this order, one configuration per subprocess.
W=/tmp/i2; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTHONUNBUFFERED=1
finish() { tar czf $OUT/i2.tgz -C $W .; echo "i2 done at $((SECONDS-T0)) s"; }
trap finish EXIT
run() {  # run NAME FUSED TIMEOUT bench_train args...
  local name=$1 fused=$2 limit=$3; shift 3
  local L=$(( 590 - (SECONDS - T0) )); (( L < 60 )) && { echo "skip $name"; return; }; (( L > limit )) && L=$limit
  env LONGNET_FUSED_LOSS=$fused timeout $L python3 tools/bench_train.py "$@" --timeout-s $((L - 5)) --out $W/$name > $W/$name.txt 2>&1
  echo "$name (fused loss $fused) rc $? at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/$name.md
}
ARGS="--presets 1.3b --contexts 128K --warmup 1 --steps 2 --fp8 delayed"
run fp8_longnet_fused 1 110 --kinds longnet $ARGS --backend fa4
run fp8_longnet_torch 0 110 --kinds longnet $ARGS --backend fa4
run fp8_dense_fused 1 140 --kinds dense $ARGS
run fp8_dense_torch 0 140 --kinds dense $ARGS
