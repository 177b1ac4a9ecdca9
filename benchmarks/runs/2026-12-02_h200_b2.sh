#!/usr/bin/env bash
# Chain B, call 2 (warm, TE + FA4 in /tmp/site): training benchmarks bf16 / FP8, FP8 loss parity, masked training.
W=/tmp/b2; mkdir -p $W; T0=$SECONDS
export PYTHONPATH=/tmp/site:$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[[ -d /tmp/site/transformer_engine ]] || { source .whl/gpu-install.sh --te > $W/install.txt 2>&1; export PYTHONPATH=$PWD:$PYTHONPATH; }
python3 -c "import transformer_engine as te, torch; print('te', te.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1
timeout 230 python3 tools/bench_train.py --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 200 --out $W/train_bf16 > $W/train_bf16.txt 2>&1; echo "bf16 at $((SECONDS-T0)) s"; tail -6 $W/train_bf16.txt
timeout 100 python3 tools/bench_train.py --kinds longnet --presets 1.3b --contexts 128K --warmup 1 --steps 2 --timeout-s 90 --fp8 delayed --out $W/train_fp8 > $W/train_fp8.txt 2>&1; echo "fp8 at $((SECONDS-T0)) s"; tail -4 $W/train_fp8.txt
timeout 130 python3 tools/bench_fp8.py --recipes delayed --steps 150 --out $W/fp8_parity > $W/fp8_parity.txt 2>&1; echo "parity at $((SECONDS-T0)) s"; tail -12 $W/fp8_parity.txt
L=$(( 540 - (SECONDS - T0) )); if (( L > 50 )); then timeout $L python3 tools/bench_train.py --kinds longnet --presets 125m --contexts 128K --doc-lens 0,4096,65536 --warmup 1 --steps 3 --timeout-s 60 --out $W/train_docs > $W/train_docs.txt 2>&1; fi; echo "docs at $((SECONDS-T0)) s"; tail -6 $W/train_docs.txt
tar czf $OUT/b2.tgz -C $W .; echo "b2 done at $((SECONDS-T0)) s"
