#!/usr/bin/env bash
# Session 6 of 2026-12-02, chain H, call 7 (calls 1-6 copied TE's pieces into /tmp/te and FA4's into /tmp/fa4;
# carry .te5 .fa2 .whl .mc19): install; the deferred merge kernel's block/warp sweep; the new code's GPU tests
# (merge kernels, gradient adds, CUDA graphs) with -v; the attention benchmark with CUDA graphs, the best
# merge block from the sweep; an eager fa4 profile at 8K.
W=$OUT; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -20 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"
timeout 60 python3 tools/bench_merge.py --n 131072,1048576 --blocks 16,32,64,128 --warps 2,4,8 --out-json $W/merge.json > $W/merge.txt 2>&1
echo "merge sweep rc $? at $((SECONDS-T0)) s"; grep -E "best|Error" $W/merge.txt
BEST=$(python3 -c "
import json; rows = json.load(open('$W/merge.json'))['rows']
b = min((r for r in rows if r['n'] == 131072), key=lambda r: r['ms']); print(f\"--merge-block {b['block']} --merge-warps {b['warps']}\")" 2>/dev/null)
echo "merge knobs: ${BEST:-defaults}"
timeout 130 python3 -m pytest -v -rfs --tb=short -p no:cacheprovider -n 4 tests/attention/test_deferred_merge.py tests/attention/test_grad_add.py tests/attention/test_graphs.py > $W/t_new.log 2>&1
echo "new tests rc $? at $((SECONDS-T0)) s"; grep -E "^FAILED|^ERROR| passed| failed" $W/t_new.log | tail -12
L=$(( 560 - (SECONDS - T0) ))
timeout $L python3 tools/bench_attention.py --n 8192,16384,131072,1048576 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 8 --backends fa4,sdpa-cudnn --dense-max-n 16384 --cuda-graph $BEST --ref "merge kernel over positions of one (batch, head) ($BEST); CUDA graphs" --out-json $W/att.json --out-md $W/att.md > $W/att.txt 2>&1
echo "bench rc $? at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/att.md
L=$(( 590 - (SECONDS - T0) ))
(( L > 15 )) && timeout $L python3 tools/bench_attention.py --n 8192 --sets geometric --head-dims 128 --target-s 0.05 --max-reps 2 --backends fa4 --no-dense --profile $BEST --out-json $W/prof.json --out-md $W/prof.md > $W/prof8k.txt 2>&1
grep -E "^profile" $W/prof8k.txt; echo "h1 done at $((SECONDS-T0)) s"
