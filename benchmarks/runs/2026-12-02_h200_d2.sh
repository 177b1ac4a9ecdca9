#!/usr/bin/env bash
# Session 3 of 2026-12-02, chain D, call 8 (warm: TE + FA4 in /tmp/site): FP8 loss parity, the
# megatron-core 0.19.2 smoke run, the attention benchmark with the final packing constants.
W=/tmp/d2; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
timeout 200 python3 tools/bench_fp8.py --recipes delayed --steps 200 --out $W/fp8_parity > $W/fp8_parity.txt 2>&1; echo "parity at $((SECONDS-T0)) s"; tail -8 $W/fp8_parity.txt
SMOKE_TESTS="-m gpu tests/attention/test_decode.py tests/attention/test_gpu_backends.py -k cudnn" timeout 260 bash tools/smoke_gpu.sh .mc19/megatron_core-0.19.2-*.whl $W > $W/smoke19.txt 2>&1; echo "smoke at $((SECONDS-T0)) s"; tail -14 $W/smoke19.txt
L=$(( 575 - (SECONDS - T0) )); (( L > 40 )) && timeout $L python3 tools/bench_attention.py --n 8192,16384,131072 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 8 --backends sdpa-cudnn,fa4,te --dense-max-n 16384 --ref "speed branch, final constants" --out-json $W/final.json --out-md $W/final.md > $W/final.txt 2>&1
echo "bench at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/final.md
tar czf $OUT/d2.tgz -C $W .; echo "d2 done at $((SECONDS-T0)) s"
