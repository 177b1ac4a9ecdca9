#!/usr/bin/env bash
# Session 3 of 2026-12-02, chain C, call 2 (FA4 staged: .fa1 copied into /tmp/fa4 by call 1; carry .fa2 .whl .before):
# GPU tests of the new call packing / fused merge / in-place gradients, then the attention benchmark
# of this branch against main (.before/main.tar, the same machine and run), a PACK_BELOW sweep, profiles.
W=/tmp/c1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
source .whl/gpu-install.sh --fa4 > $W/install.txt 2>&1 || { tail -5 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"
left() { echo $(( 560 - (SECONDS - T0) )); }
# 1. tests (compiled Triton merge; sdpa kernels and triton on views and packed calls; the fa4 quick subset)
timeout 60 python3 -m pytest -q tests/attention/test_merge.py > $W/t_merge.log 2>&1; tail -1 $W/t_merge.log
LONGNET_TEST_BACKENDS=sdpa,sdpa-cudnn,sdpa-flash,triton timeout 120 python3 -m pytest -q -rs tests/attention/test_gpu_backends.py > $W/t_sdpa.log 2>&1; tail -1 $W/t_sdpa.log
LONGNET_TEST_BACKENDS=fa4 timeout 120 python3 -m pytest -q -rs tests/attention/test_gpu_backends.py -k "fa4 and (lse_and_strided or varlen_call or unsupported or (bf16 and (paper_ragged_d128 or gqa_noncausal_d64 or geometric_partial_d128)))" > $W/t_fa4.log 2>&1; tail -1 $W/t_fa4.log
echo "tests at $((SECONDS-T0)) s"
# 2. benchmark, this branch
B="--sets geometric --head-dims 128 --target-s 0.2 --max-reps 8"
timeout 200 python3 tools/bench_attention.py --n 8192,16384,131072,1048576 $B --backends sdpa-cudnn,fa4 --dense-max-n 131072 --ref "speed branch" --out-json $W/after.json --out-md $W/after.md > $W/after.txt 2>&1
echo "after at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/after.md
# 3. main, same run
mkdir -p /tmp/before && tar xf .before/main.tar -C /tmp/before
(cd /tmp/before && PYTHONPATH=/tmp/site:/tmp/before:/tmp/site/nvidia_cutlass_dsl/dsl_packages timeout 120 python3 tools/bench_attention.py --n 8192,16384,131072 $B --backends sdpa-cudnn,fa4 --no-dense --out-json $W/before.json --out-md $W/before.md > $W/before.txt 2>&1)
echo "before at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/before.md
# 4. PACK_BELOW 2^22 at 128K (r = 8 tasks stay views)
timeout 60 python3 tools/bench_attention.py --n 131072 $B --backends sdpa-cudnn,fa4 --no-dense --pack-below 4194304 --ref "speed branch, PACK_BELOW=2^22" --out-json $W/pack22.json --out-md $W/pack22.md > $W/pack22.txt 2>&1
grep -E "^\| [0-9]" $W/pack22.md; echo "pack at $((SECONDS-T0)) s"
# 5. document masking at 1M on fa4 and sdpa (issue 18)
L=$(left); (( L > 150 )) && timeout $((L - 90)) python3 tools/bench_attention.py --n 1048576 $B --backends fa4,sdpa-cudnn --no-dense --doc-lens 4096,65536 --ref "speed branch" --out-json $W/docs.json --out-md $W/docs.md > $W/docs.txt 2>&1
grep -E "^\| [0-9]" $W/docs.md; echo "docs at $((SECONDS-T0)) s"
# 6. profiles after
L=$(left); (( L > 40 )) && timeout $((L - 15)) python3 tools/bench_attention.py --n 8192,131072 $B --backends fa4 --no-dense --profile --target-s 0.05 --out-json $W/prof.json --out-md $W/prof.md > $W/profile.txt 2>&1
echo "profile at $((SECONDS-T0)) s"
tar czf $OUT/c1.tgz -C $W .; echo "c1 done at $((SECONDS-T0)) s"
