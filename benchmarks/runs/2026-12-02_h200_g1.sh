#!/usr/bin/env bash
# Session 5 of 2026-12-02, chain G, call 7 (TE pieces copied into /tmp/te by calls 1-4, FA4's into /tmp/fa4 by
# calls 5-6; carry .te5 .fa2 .whl .mc19): install TE + FA4; the GPU tests of the deferred merge and the fused
# gradient add (compiled Triton), the fa4 and sdpa-cudnn oracle tests on the new forward; the attention
# benchmark, deferred against the online merge, fa4 and sdpa-cudnn, with dense cuDNN at 8K and 16K.
W=/tmp/g1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; } > $W/device.txt
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -20 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"; tail -1 $W/install.txt
finish() { tar czf $OUT/g1.tgz -C $W .; echo "g1 done at $((SECONDS-T0)) s"; }
trap finish EXIT
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/attention/test_deferred_merge.py tests/attention/test_grad_add.py tests/attention/test_merge.py > $W/t_kernels.log 2>&1; echo "kernels rc $? at $((SECONDS-T0)) s"; tail -2 $W/t_kernels.log
LONGNET_TEST_BACKENDS=fa4,sdpa-cudnn LONGNET_GPU_RESULTS=$W/gpu_fa4_cudnn.json timeout 150 python3 -m pytest -q -rs -p no:cacheprovider -n 4 tests/attention/test_gpu_backends.py tests/attention/test_fa4_backend.py -k "not documents or record_worst" > $W/t_fa4_cudnn.log 2>&1; echo "oracle rc $? at $((SECONDS-T0)) s"; tail -3 $W/t_fa4_cudnn.log
timeout 110 python3 tools/bench_attention.py --n 8192,16384,131072,1048576 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 8 --backends fa4,sdpa-cudnn --dense-max-n 16384 --ref 'deferred merge + fused gradient adds' --out-json $W/deferred.json --out-md $W/deferred.md > $W/bench_deferred.txt 2>&1; echo "bench deferred at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/deferred.md
timeout 70 python3 tools/bench_attention.py --n 8192,16384,131072,1048576 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 8 --backends fa4,sdpa-cudnn --no-dense --merge fused --ref 'online merge (as main before), same process type' --out-json $W/online.json --out-md $W/online.md > $W/bench_online.txt 2>&1; echo "bench online at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/online.md
L=$(( 560 - (SECONDS - T0) )); (( L > 40 )) && timeout $L python3 tools/bench_attention.py --n 131072 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 4 --backends fa4 --no-dense --profile --out-json $W/profile.json --out-md $W/profile.md > $W/profile.txt 2>&1; grep -E "profile" $W/profile.txt | head -4
