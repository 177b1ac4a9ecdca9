#!/usr/bin/env bash
# Session 5 of 2026-12-02, chain G, call 8 (warm after call 7: /tmp/site holds TE + FA4): 1.3b at 1M tokens on
# the one H200 with the memory planner's choice (full recompute + MLP in 64K-token chunks + layer inputs
# offloaded to pinned host memory), fa4 attention; one warm-up and one timed step.
W=/tmp/g2; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache PYTHONUNBUFFERED=1
finish() { tar czf $OUT/g2.tgz -C $W --exclude '*.bin' --exclude '*.idx' --exclude '*.npy' --exclude '*.pt' --exclude '*.distcp' .; echo "g2 done at $((SECONDS-T0)) s"; free -g | head -2; }
trap finish EXIT
(while sleep 20; do echo "$((SECONDS-T0)) s: $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader) host $(free -g | awk '/Mem/{print $3}') GiB"; done) > $W/monitor.txt 2>&1 &
timeout 570 python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 1M --warmup 1 --steps 1 --timeout-s 560 --backend fa4 --out $W/train_1m > $W/train_1m.txt 2>&1
echo "1M at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_1m.md; grep -h -E "memory plan|step |Error|error|Killed" $W/train_1m.txt | tail -8; tail -3 $W/monitor.txt
