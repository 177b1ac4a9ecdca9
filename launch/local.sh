#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU (or per CPU slot with gloo).
#
#   launch/local.sh NPROC CONFIG [section.field=value ...]
#   launch/local.sh 8 configs/gpu_125m_32k.yaml train.steps=500
#   launch/local.sh 2 configs/tiny_cpu.yaml parallel.tensor_model_parallel_size=2
#
# Environment: PYTHON (default: python), MASTER_PORT (default: a free port chosen by torchrun).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG [section.field=value ...]" >&2
    exit 2
fi
nproc="$1"
shift

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP comm-compute overlap ordering
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node="$nproc" \
    -m longnet_megatron.train "$@"
