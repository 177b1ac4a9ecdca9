#!/usr/bin/env bash
# Session 5 of 2026-12-02, chain G, call 9 (warm): LongNet 1.3b at 128K, bf16 and FP8 (delayed), fa4 with the
# deferred merge, against the fourth session's rows (same settings); then the sdpa / sdpa-flash / triton GPU
# oracle suite on the new forward.
W=/tmp/g3; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTHONUNBUFFERED=1
finish() { tar czf $OUT/g3.tgz -C $W .; echo "g3 done at $((SECONDS-T0)) s"; }
trap finish EXIT
timeout 110 python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 105 --backend fa4 --out $W/train_bf16 > $W/train_bf16.txt 2>&1
echo "bf16 at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_bf16.md
timeout 100 python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 95 --fp8 delayed --backend fa4 --out $W/train_fp8 > $W/train_fp8.txt 2>&1
echo "fp8 at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_fp8.md
L=$(( 430 - (SECONDS - T0) )); (( L > 30 )) && LONGNET_TEST_BACKENDS=sdpa,sdpa-flash,triton LONGNET_GPU_RESULTS=$W/gpu_sdpa.json timeout $L python3 -m pytest -q -rs -p no:cacheprovider -n 4 tests/attention/test_gpu_backends.py tests/attention/test_fused_triton.py tests/attention/test_triton_backend.py tests/attention/test_decode.py > $W/t_sdpa.log 2>&1; echo "sdpa suite rc $? at $((SECONDS-T0)) s"; tail -3 $W/t_sdpa.log
