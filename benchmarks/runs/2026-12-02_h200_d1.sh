#!/usr/bin/env bash
# Session 3 of 2026-12-02, chain D, call 7 (TE pieces copied into /tmp/te, FA4's into /tmp/fa4 by calls 1-6;
# carry .te5 .fa2 .whl .mc19): install TE + FA4, the full fa4 GPU test suite, LongNet 1.3b@128K FP8 on fa4.
W=/tmp/d1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -5 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"; tail -1 $W/install.txt
LONGNET_TEST_BACKENDS=fa4 timeout 260 python3 -m pytest -q -rs tests/attention/test_gpu_backends.py tests/attention/test_fa4_backend.py > $W/t_fa4_full.log 2>&1; echo "rc $?"; tail -3 $W/t_fa4_full.log
echo "fa4 tests at $((SECONDS-T0)) s"
L=$(( 570 - (SECONDS - T0) )); (( L > 60 )) && timeout $L python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s $((L - 10)) --fp8 delayed --backend fa4 --out $W/train_fp8_fa4 > $W/train_fp8_fa4.txt 2>&1
echo "train at $((SECONDS-T0)) s"; tail -4 $W/train_fp8_fa4.txt
tar czf $OUT/d1.tgz -C $W .; echo "d1 done at $((SECONDS-T0)) s"
