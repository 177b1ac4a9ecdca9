#!/usr/bin/env bash
# Chain B, call 1: TE + FA4 install; fa4 GPU tests, fa4 attention rows, Figure 5, TE varlen (document) tests.
W=/tmp/b1; mkdir -p $W; T0=$SECONDS
left() { echo $(( ${1:-560} - (SECONDS - T0) )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date; } > $W/device.txt
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -30 $W/install.txt; }
echo "install done at $((SECONDS-T0)) s"; tail -3 $W/install.txt
export PYTHONPATH=$PWD:$PYTHONPATH FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -c "import flash_attn.cute, torch, transformer_engine as te; print('fa4 + te', te.__version__, 'on', torch.cuda.get_device_name())" 2>&1 | tail -1
LONGNET_TEST_BACKENDS=fa4 LONGNET_GPU_RESULTS=$W/fa4_quick.json timeout 110 python3 -m pytest -q -rs -p no:cacheprovider tests/attention/test_gpu_backends.py -k "fa4 and (lse_and_strided or varlen_call or unsupported or (bf16 and (paper_ragged_d128 or gqa_noncausal_d64))) or record_worst" > $W/fa4_quick.txt 2>&1; echo "fa4 quick at $((SECONDS-T0)) s"; tail -4 $W/fa4_quick.txt
timeout 100 python3 tools/bench_attention.py --n 8192,16384,131072,1048576 --sets geometric --backends sdpa-cudnn,fa4 --head-dims 128 --dense-max-n 131072 --out-json $W/attention_fa4.json --out-md $W/attention_fa4.md > $W/bench_fa4.txt 2>&1; echo "bench at $((SECONDS-T0)) s"; tail -14 $W/bench_fa4.txt
LONGNET_TEST_BACKENDS=te LONGNET_GPU_RESULTS=$W/te_docs.json timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/attention/test_gpu_backends.py -k "documents or varlen or record_worst" > $W/te_docs.txt 2>&1; echo "te docs at $((SECONDS-T0)) s"; tail -4 $W/te_docs.txt
B=$(( $(left 540) - 30 )); if (( B > 60 )); then timeout $((B+25)) python3 tools/figure5.py --budget-s $B --out $W/figure5 > $W/figure5.txt 2>&1; fi; echo "figure5 at $((SECONDS-T0)) s"; tail -25 $W/figure5.txt
L=$(left 575); if (( L > 40 )); then LONGNET_TEST_BACKENDS=fa4 LONGNET_GPU_RESULTS=$W/fa4_docs.json timeout $((L-10)) python3 -m pytest -q -rs -p no:cacheprovider tests/attention/test_gpu_backends.py -k "fa4 and documents and bf16 or record_worst" > $W/fa4_docs.txt 2>&1; tail -3 $W/fa4_docs.txt; fi
tar czf $OUT/b1.tgz -C $W .; echo "b1 done at $((SECONDS-T0)) s"
