#!/usr/bin/env bash
# LongNet pretraining on SLURM: one task per GPU through srun, requeued on preemption / time limit.
#
#   mkdir -p logs
#   sbatch launch/pretrain.sh CONFIG [section.field=value ...]
#   sbatch --nodes=4 --time=2-00:00:00 launch/pretrain.sh configs/multinode_1b_256k.yaml optim.lr=2e-4
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.01-py3 sbatch launch/pretrain.sh configs/gpu_125m_32k.yaml
#
# The #SBATCH lines are defaults: edit them, or override on the sbatch command line.
# --signal=USR1@300: SLURM signals every task 300 s before the time limit; the trainer checkpoints
# and exits with 75, and this script requeues the job, which resumes from the checkpoint.
#
# Environment (all optional):
#   CONTAINER_IMAGE   pyxis image (srun --container-image); empty: run on the host
#   CONTAINER_MOUNTS  pyxis mounts; default: the repository and RUN_ROOT at the same paths
#   RUN_ROOT          parent of the per-job run directories (default: <repo>/runs)
#   PYTHON            interpreter inside the job (default: python)
#   MASTER_PORT       rendezvous port (default: derived from the job id)
#
#SBATCH --job-name=longnet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

readonly REQUEUE_EXIT_CODE=75   # longnet_megatron.train.signals.REQUEUE_EXIT_CODE

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 CONFIG [section.field=value ...]" >&2
    exit 2
fi
config="$1"
shift

# sbatch runs a copy of this script from the spool directory: find the repository from the submit dir.
repo="${LONGNET_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$repo"
if [[ ! -d longnet_megatron ]]; then
    echo "$repo is not the longnet-megatron repository: submit from its root or set LONGNET_REPO" >&2
    exit 2
fi

job_id="${SLURM_JOB_ID:?not inside a SLURM allocation}"
job_name="${SLURM_JOB_NAME:-longnet}"
run_root="${RUN_ROOT:-$repo/runs}"
run_dir="$run_root/$job_name-$job_id"   # same id after a requeue: the job resumes its own checkpoints
mkdir -p "$run_dir"

# Rendezvous: the first node of the allocation.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((10000 + job_id % 50000))}"
export MASTER_ADDR MASTER_PORT

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1          # Megatron: keep TP/SP communication ordered with compute
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # NVLink multicast off (not available everywhere)

srun_args=(--export=ALL --cpu-bind=none)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE"
                --container-mounts="${CONTAINER_MOUNTS:-$repo:$repo,$run_root:$run_root}"
                --container-workdir="$repo")
fi

echo "job $job_id (${SLURM_JOB_NUM_NODES:-1} node(s), ${SLURM_NTASKS:-?} tasks): $config $*"
echo "run dir $run_dir; rendezvous $MASTER_ADDR:$MASTER_PORT; restarts ${SLURM_RESTART_COUNT:-0}"

set +e
srun "${srun_args[@]}" "${PYTHON:-python}" -m longnet_megatron.train "$config" run.dir="$run_dir" "$@"
status=$?
set -e

if [[ $status -eq $REQUEUE_EXIT_CODE ]]; then
    echo "training checkpointed on a signal: requeueing job $job_id"
    scontrol requeue "$job_id"
    exit 0
fi
exit "$status"
