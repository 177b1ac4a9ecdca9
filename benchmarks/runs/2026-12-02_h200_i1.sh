#!/usr/bin/env bash
# Session 7 of 2026-12-02, chain I, call 7 (calls 1-6 copied TE's pieces into /tmp/te and FA4's into /tmp/fa4;
# carry .te5 .fa2 .whl): install; the chunked loss (Triton kernels against the PyTorch path) benchmark and its
# GPU tests; the kept deferred-merge kernel's block/warp sweep; 8K and 16K fwd+bwd replayed from CUDA graphs
# with short plans packed whole (as before) and not (pack_whole_plan=False), and with all packing off; the GPU
# tests of graphs with and without plan packing; an eager profile of 8K without whole-plan packing.
W=/tmp/i1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache
finish() { tar czf $OUT/i1.tgz -C $W .; echo "i1 done at $((SECONDS-T0)) s"; }
trap finish EXIT
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -20 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"
left() { echo $(( $1 - (SECONDS - T0) )); }
timeout 120 python3 tools/bench_loss.py --n 32768,131072 --out-json $W/loss.json --out-md $W/loss.md > $W/loss.txt 2>&1
echo "loss bench rc $? at $((SECONDS-T0)) s"; grep -E "^N=|Error|error" $W/loss.txt | tail -6
timeout 90 python3 -m pytest -v -rfs --tb=short -p no:cacheprovider -m gpu tests/model/test_chunked_loss.py > $W/t_loss.log 2>&1
echo "loss tests rc $? at $((SECONDS-T0)) s"; grep -E "PASSED|FAILED|ERROR| passed| failed" $W/t_loss.log | tail -5
timeout 60 python3 tools/bench_merge.py --n 131072,1048576 --blocks 8,16,32,64 --warps 2,4,8 --out-json $W/merge.json > $W/merge.txt 2>&1
echo "merge sweep rc $? at $((SECONDS-T0)) s"; grep -E "best|Error" $W/merge.txt
COMMON="--n 8192,16384 --sets geometric --head-dims 128 --target-s 0.2 --max-reps 8 --backends fa4 --dense-max-n 16384 --cuda-graph"
for spec in "packed:" "graphunpacked:--graph-no-plan-packing" "nopack:--pack-below 0 --pack-plan-below 0"; do
  name=${spec%%:*}; flags=${spec#*:}; L=$(left 470); (( L < 30 )) && { echo "skip $name"; continue; }
  (( L > 100 )) && L=100
  timeout $L python3 tools/bench_attention.py $COMMON $flags --ref "packing: $name" --out-json $W/att_$name.json --out-md $W/att_$name.md > $W/att_$name.txt 2>&1
  echo "att $name rc $? at $((SECONDS-T0)) s"; grep -E "^\| [0-9]" $W/att_$name.md
done
L=$(left 560); (( L > 20 )) && LONGNET_TEST_BACKENDS=fa4 timeout $L python3 -m pytest -q -rfs --tb=short -p no:cacheprovider -m gpu tests/attention/test_graphs.py -k "plan-unpacked or survive" > $W/t_graphs.log 2>&1
echo "graph tests rc $? at $((SECONDS-T0)) s"; tail -3 $W/t_graphs.log
L=$(left 590); (( L > 15 )) && timeout $L python3 tools/bench_attention.py --n 8192 --sets geometric --head-dims 128 --target-s 0.05 --max-reps 2 --backends fa4 --no-dense --profile --pack-plan-below 0 --out-json $W/prof.json --out-md $W/prof.md > $W/prof8k.txt 2>&1
grep -E "^profile" $W/prof8k.txt
