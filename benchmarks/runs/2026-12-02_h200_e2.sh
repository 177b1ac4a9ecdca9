#!/usr/bin/env bash
# Session 4 of 2026-12-02, chain E, call 8 (warm: TE + FA4 in /tmp/site): 1.3b@128K LongNet (fa4) and dense
# in bf16 and LongNet in FP8, the same machine as call 7's dense FP8; the sdpa / cudnn / flash / triton GPU
# suite (4 pytest workers on the one GPU) and the auto-order test; fa4 document masking in training.
W=/tmp/e2; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1
left() { echo $(( 575 - (SECONDS - T0) )); }
finish() { tar czf $OUT/e2.tgz -C $W .; echo "e2 done at $((SECONDS-T0)) s"; }
trap finish EXIT
LONGNET_TEST_BACKENDS=sdpa,sdpa-cudnn,sdpa-flash,triton timeout 200 python3 -m pytest -q -rs -n 4 tests/attention/test_gpu_backends.py > $W/t_sdpa.log 2>&1
echo "tests rc $? at $((SECONDS-T0)) s"; tail -4 $W/t_sdpa.log
timeout 170 python3 tools/bench_train.py --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 160 --backend fa4 --out $W/train_bf16 > $W/train_bf16.txt 2>&1
echo "bf16 at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_bf16.md
timeout 80 python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 75 --fp8 delayed --backend fa4 --out $W/train_fp8 > $W/train_fp8.txt 2>&1
echo "fp8 at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_fp8.md
L=$(left); (( L > 50 )) && timeout $L python3 tools/bench_train.py --kinds longnet --presets 125m --contexts 128K --doc-lens 0,4096,65536 --warmup 1 --steps 3 --timeout-s 45 --backend fa4 --out $W/train_docs > $W/train_docs.txt 2>&1
echo "docs at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_docs.md
