#!/usr/bin/env bash
# Session 4 of 2026-12-02, chain E, call 7 (TE pieces copied into /tmp/te, FA4's into /tmp/fa4 by calls 1-6;
# carry .te5 .fa2 .whl): install TE + FA4; dense 1.3b@128K in FP8 (the baseline issue #21 lacks); the FP8
# loss-parity run (125m, L=4096, bf16 against delayed / tensorwise / blockwise, sdpa attention).
W=/tmp/e1; mkdir -p $W; T0=$SECONDS
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1
source .whl/gpu-install.sh --te --fa4 > $W/install.txt 2>&1 || { tail -5 $W/install.txt; exit 1; }
echo "install at $((SECONDS-T0)) s"; tail -1 $W/install.txt
left() { echo $(( 575 - (SECONDS - T0) )); }
finish() { tar czf $OUT/e1.tgz -C $W --exclude '*.bin' --exclude '*.idx' --exclude '*.npy' .; echo "e1 done at $((SECONDS-T0)) s"; }
trap finish EXIT
timeout 130 python3 tools/bench_train.py --kinds dense --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 120 --fp8 delayed --out $W/train_dense_fp8 > $W/train_dense_fp8.txt 2>&1
echo "dense fp8 at $((SECONDS-T0)) s"; grep -E "^\| (dense|longnet)" $W/train_dense_fp8.md
timeout $(left) python3 tools/bench_fp8.py --recipes delayed,tensorwise,blockwise --steps 300 --backend sdpa --workdir $W/fp8work --out $W/fp8_parity > $W/fp8_parity.txt 2>&1
echo "parity at $((SECONDS-T0)) s"; tail -12 $W/fp8_parity.txt
