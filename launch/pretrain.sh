#!/usr/bin/env bash
# LongNet pretraining on Slurm: one task per GPU through srun, requeued on a time limit or preemption.
#
#   sbatch --gpus-per-node=8 launch/pretrain.sh CONFIG [section.field=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --time=2-00:00:00 launch/pretrain.sh configs/multinode_1b_256k.yaml
#   sbatch --ntasks=2 --time=30 --signal=USR1@120 launch/pretrain.sh configs/tiny_cpu.yaml   # no GPUs
#   CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.01-py3 sbatch --gpus-per-node=8 launch/pretrain.sh CONFIG
#
# The #SBATCH lines are defaults: override them on the sbatch command line. They ask for whole nodes
# and no GPUs (a GPU request fails at once on nodes without them). Tasks follow the allocation: an
# explicit --ntasks / --ntasks-per-node, else one per allocated GPU, else one per node; each task
# gets its share of the node's CPUs. Submit from the repository root (logs/ is part of it), or set
# LONGNET_REPO and pass --output.
#
# --signal=USR1@300: Slurm signals the tasks 300 s before the time limit; the trainer checkpoints and
# exits with 75, and this script requeues the job (same id, same run directory), which resumes from
# the checkpoint. The same on SIGTERM (the time limit itself) and on `scancel --signal=USR1 JOB`.
# Keep the lead time below --time: a signal during start-up only makes the trainer exit again.
#
# Environment (all optional):
#   CONTAINER_IMAGE   pyxis image (srun --container-image); empty: run on the host
#   CONTAINER_MOUNTS  pyxis mounts; default: the repository and RUN_ROOT at the same paths
#   RUN_ROOT          parent of the per-job run directories (default: <repo>/runs)
#   PYTHON            interpreter inside the job (default: python)
#   MASTER_PORT       rendezvous port (default: derived from the job id)
#   MAX_REQUEUES      requeue at most this many times (default: 20)
#
#SBATCH --job-name=longnet
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

readonly REQUEUE_EXIT_CODE=75   # longnet_megatron.train.signals.REQUEUE_EXIT_CODE

say() { echo "launch/pretrain.sh: $*"; }
die() { echo "launch/pretrain.sh: $*" >&2; exit 2; }

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 CONFIG [section.field=value ...]" >&2
    exit 2
fi
config="$1"
shift

# sbatch runs a copy of this script from the spool directory: find the repository from the submit dir.
repo="${LONGNET_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$repo"
[[ -d longnet_megatron ]] || die "$repo is not the longnet-megatron repository: submit from its root or set LONGNET_REPO"

job_id="${SLURM_JOB_ID:?not inside a SLURM allocation}"
job_name="${SLURM_JOB_NAME:-longnet}"
run_root="${RUN_ROOT:-$repo/runs}"
run_dir="$run_root/$job_name-$job_id"   # same id after a requeue: the job resumes its own checkpoints
restarts="${SLURM_RESTART_COUNT:-0}"
max_requeues="${MAX_REQUEUES:-20}"
mkdir -p "$run_dir"

# Tasks per node: what was asked for, else one per GPU of the allocation, else one.
nodes="${SLURM_JOB_NUM_NODES:-1}"
gpus="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$gpus" && -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]]; then
    gpus="$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)"
fi
gpus="${gpus:-0}"
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    tasks_per_node="${SLURM_NTASKS_PER_NODE%%(*}"   # "8" or "8(x4)"
elif [[ -n "${SLURM_NTASKS:-}" ]]; then
    (( SLURM_NTASKS % nodes == 0 )) || die "--ntasks=$SLURM_NTASKS is not a multiple of --nodes=$nodes"
    tasks_per_node=$(( SLURM_NTASKS / nodes ))
elif (( gpus > 0 )); then
    tasks_per_node="$gpus"
else
    tasks_per_node=1
fi
cpus_on_node="${SLURM_CPUS_ON_NODE:-$(getconf _NPROCESSORS_ONLN)}"
cpus_per_task="${SLURM_CPUS_PER_TASK:-$(( cpus_on_node / tasks_per_node ))}"
(( cpus_per_task >= 1 )) || die "$tasks_per_node tasks per node but only $cpus_on_node CPUs allocated on $(hostname -s): ask for fewer tasks or more CPUs (--exclusive)"
ntasks=$(( nodes * tasks_per_node ))

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

srun_args=(--nodes="$nodes" --ntasks="$ntasks" --ntasks-per-node="$tasks_per_node"
           --cpus-per-task="$cpus_per_task" --export=ALL --cpu-bind=none)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE"
                --container-mounts="${CONTAINER_MOUNTS:-$repo:$repo,$run_root:$run_root}"
                --container-workdir="$repo")
fi

# Where the trainer keeps its checkpoints (checkpoint.dir, default <run dir>/checkpoints), to tell an
# attempt that saved from one that did not; read once per job (a requeue runs the same command), and
# unknown (no such check) where this host's PYTHON cannot read the config, e.g. when only the
# container has the packages.
checkpoint_dir_file="$run_dir/.checkpoint-dir"
if [[ ! -s "$checkpoint_dir_file" ]]; then
    "${PYTHON:-python}" -c 'import sys
from longnet_megatron.train.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).checkpoint_dir)' "$config" run.dir="$run_dir" "$@" \
        > "$checkpoint_dir_file" 2>/dev/null || rm -f "$checkpoint_dir_file"
fi
checkpoint_dir="$(cat "$checkpoint_dir_file" 2>/dev/null || true)"
latest_marker() { cat "$checkpoint_dir/latest" 2>/dev/null || true; }

echo "job $job_id ($nodes node(s) x $tasks_per_node task(s), $cpus_per_task CPU(s) and $gpus GPU(s) per node): $config $*"
echo "run dir $run_dir; rendezvous $MASTER_ADDR:$MASTER_PORT; restarts $restarts"
if (( gpus == 0 )); then
    say "no GPU in the allocation: training on CPU (on GPU nodes pass --gpus-per-node=N)"
fi

# Slurm signals this shell too (the time limit's SIGTERM; USR1 with --signal=B:... or scancel --full):
# stay alive to requeue, and pass USR1 on to srun, which hands it to the tasks.
srun_pid=""
trap 'say "SIGTERM: waiting for the trainer to checkpoint"' TERM
trap 'say "SIGUSR1: passing it to the tasks"; [[ -z "$srun_pid" ]] || kill -USR1 "$srun_pid" 2>/dev/null || true' USR1

before="$(latest_marker)"
srun "${srun_args[@]}" "${PYTHON:-python}" -m longnet_megatron.train "$config" run.dir="$run_dir" "$@" &
srun_pid=$!
status=0
while true; do  # a trapped signal interrupts `wait` (status > 128) while srun still runs
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
after="$(latest_marker)"

if [[ $status -ne $REQUEUE_EXIT_CODE ]]; then
    exit "$status"
fi
read -r state reason <<< "$(squeue -h -j "$job_id" -o '%T %r' 2>/dev/null || true)"
if [[ "$state" != RUNNING && "$reason" != TimeLimit ]]; then
    say "training checkpointed (${after:-no checkpoint}); job $job_id is ${state:-gone} (${reason:-?}): not requeued"
    exit "$status"
fi
stalled="$run_dir/.requeued-without-progress"
if [[ -z "$checkpoint_dir" ]]; then
    :  # no way to tell progress: MAX_REQUEUES is the only limit
elif [[ "$after" == "$before" ]]; then
    say "signalled before this attempt saved anything new (during start-up?): if --time is not longer" \
        "than --signal's lead time (default USR1@300: 5 minutes), every attempt is signalled at start;" \
        "pass e.g. --signal=USR1@60 for a 10-minute --time"
    if [[ -e "$stalled" ]]; then
        say "two attempts in a row made no progress: not requeued"
        exit "$status"
    fi
    touch "$stalled"
else
    rm -f "$stalled"
fi
if (( restarts >= max_requeues )); then
    say "requeued $restarts times already (MAX_REQUEUES=$max_requeues): not requeued; latest is ${after:-none}"
    exit "$status"
fi
echo "training checkpointed on a signal: requeueing job $job_id"
scontrol requeue "$job_id" || { say "scontrol requeue $job_id failed"; exit "$status"; }
exit 0
