#!/usr/bin/env bash
# Session 4 of 2026-12-02, chain F, call 5 (TE pieces copied into /tmp/te by calls 1-4; carry .te5 .whl):
# install TE; the FP8 loss-parity run at L=32K (125m, one 32K sequence a step, 200 steps, bf16 against
# delayed, sdpa attention: chain E's L=4096 run spent 0.85 s a step on the host); then 1.3b at 1M on the
# one H200 with the memory planner's choice (full recompute + chunked MLP + offloaded layer inputs).
W=/tmp/f1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
source .whl/gpu-install.sh --te > $W/install.txt 2>&1 || { tail -5 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"; tail -1 $W/install.txt
finish() { tar czf $OUT/f1.tgz -C $W --exclude '*.bin' --exclude '*.idx' --exclude '*.npy' .; echo "f1 done at $((SECONDS-T0)) s"; }
trap finish EXIT
timeout 185 python3 tools/bench_fp8.py --recipes delayed,tensorwise --seq-length 32768 --global-batch 1 --steps 200 --backend sdpa --workdir $W/fp8work --out $W/fp8_parity > $W/fp8_parity.txt 2>&1
echo "parity at $((SECONDS-T0)) s"; grep -v -i warn $W/fp8_parity.txt | tail -8
L=$(( 470 - (SECONDS - T0) ))
(( L > 60 )) && timeout $L python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 1M --warmup 1 --steps 1 --timeout-s $((L - 5)) --backend sdpa --out $W/train_1m > $W/train_1m.txt 2>&1
echo "1M at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_1m.md; grep -h -E "memory plan|step |Error|error" $W/train_1m.txt | tail -6; free -g | head -2
