"""``sbatch launch/pretrain.sh`` on a real Slurm: preempted, then at its time limit; requeued, resumed exactly.

Needs running Slurm daemons with a node free for 2 tasks: ``tests/slurm/cluster.sh start`` makes a
one-node cluster on this machine (.ci/run does, and sets LONGNET_SLURM_CLUSTER=1, which turns the
skip below into a failure). Slurm signals every process of a job step, the trainer's helpers
included (Megatron's checkpoint writer, DataLoader workers): the runs save every 5 steps, so those
helpers exist when the signal comes. Each run is compared, loss for loss, with an uninterrupted run
of the same configuration (launch/local.sh, alongside: it runs while the first test waits for
Slurm's clock). The fake-Slurm tests (test_launch.py) stay for fast feedback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.train.conftest import REPO
from tests.train.launching import launch_env, read_metrics

pytestmark = pytest.mark.slow

STEPS = 30
REQUIRED = os.environ.get("LONGNET_SLURM_CLUSTER") == "1"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _slurm_unusable() -> str | None:
    """Why no job can run here (None: a Slurm controller answers and a node is up)."""
    if shutil.which("sbatch") is None:
        return "no Slurm client (sbatch) on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            said = [line for line in (ping.stdout + ping.stderr).splitlines() if line.strip(" *")]
            return f"no Slurm controller answers (scontrol ping: {said[0] if said else ping.returncode})"
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Slurm controller does not answer"
    states = nodes.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no Slurm node is up (sinfo: {' '.join(states) or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = _slurm_unusable()
    if reason is None:
        return
    message = f"{reason}; start one with `tests/slurm/cluster.sh start`"
    if REQUIRED:
        pytest.fail(f"LONGNET_SLURM_CLUSTER=1 but {message}", pytrace=False)
    pytest.skip(message)


def _overrides(prefix: str) -> list[str]:
    return [
        f"data.prefixes=[{prefix}]",
        f"train.steps={STEPS}",
        "train.micro_batch_size=1",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        "data.num_workers=1",  # DataLoader workers are processes Slurm signals too
        "optim.warmup_steps=1",
        "optim.decay_steps=1000",
        "logging.interval=1",
        "logging.tensorboard=false",
        "checkpoint.interval=5",  # the first save starts Megatron's writer helpers
    ]


def _losses(run_dir: str) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(slurm, packed_prefix, tmp_path_factory):
    """The same run without interruption, on 2 processes through launch/local.sh (started now)."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "local.sh"), "2", "configs/tiny_cpu.yaml"]
        + [*_overrides(packed_prefix), f"run.dir={run_dir}"],
        env=launch_env(PYTHON=sys.executable),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def losses() -> list[tuple[int, float, float]]:
        if proc.returncode is None:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
        return _losses(run_dir)

    yield losses
    if proc.poll() is None:
        proc.kill()


def _slurm_env(run_root: str) -> dict[str, str]:
    env = launch_env(RUN_ROOT=run_root, PYTHON=sys.executable)
    if "SLURM_CONF" in os.environ:  # launch_env drops SLURM_*; the clients need this one
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return env


def _submit(sbatch_options: list[str], prefix: str, tmp_path) -> tuple[str, str]:
    """``sbatch [options] launch/pretrain.sh`` the tiny run from the repository root: (job id, run dir)."""
    run_root = str(tmp_path / "runs")
    submitted = subprocess.run(
        ["sbatch", "--parsable", *sbatch_options, "launch/pretrain.sh", "configs/tiny_cpu.yaml"]
        + _overrides(prefix),
        cwd=REPO,
        env=_slurm_env(run_root),
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    return job_id, os.path.join(run_root, f"longnet-{job_id}")


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _seconds(run_time: str) -> int:
    days, _, clock = run_time.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _wait(what: str, condition, job_id: str, log: str, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"job {job_id}: no {what} within {timeout_s} s; {_job(job_id)}\n{_tail(log)}")


def _tail(log: str) -> str:
    if not os.path.exists(log):
        return f"(no {log})"
    with open(log) as f:
        return "".join(f.readlines()[-40:])


def _wait_for_step(job_id: str, run_dir: str, log: str, step: int) -> None:
    def reached():
        if _job(job_id)["JobState"] in ENDED:
            raise AssertionError(f"job {job_id} ended before step {step}\n{_tail(log)}")
        rows = read_metrics(run_dir)
        return rows and rows[-1]["step"] >= step

    _wait(f"step {step}", reached, job_id, log)


def _wait_until_ended(job_id: str, log: str) -> dict[str, str]:
    return _wait("end", lambda: (job := _job(job_id))["JobState"] in ENDED and job, job_id, log)


def _tasks(run_dir: str) -> list[psutil.Process]:
    """The trainer processes srun started (children of slurmstepd) for this run directory."""
    tasks = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"run.dir={run_dir}" in cmdline and "longnet_megatron.train" in cmdline:
            try:
                if proc.parent().name().startswith("slurmstepd"):
                    tasks.append(proc)
            except psutil.NoSuchProcess:
                pass
    return tasks


def _pending(pid: int) -> set[str] | None:
    """The signals waiting for process ``pid`` (blocked or stopped), from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields["State"].split()[0] in ("Z", "X"):
        return None
    bits = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return {s.name for s in signal.Signals if bits & (1 << (s - 1))}


def _check_resumed_run(job_id: str, run_dir: str, log: str, want, restarts: int) -> None:
    """Requeued (same id), each attempt resumed at the step the last one saved, every step once,
    losses bit-identical to the uninterrupted run."""
    job = _wait_until_ended(job_id, log)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == str(restarts), (job, _tail(log))
    with open(log) as f:
        text = f.read()
    assert text.count(f"requeueing job {job_id}") == restarts
    # every rank logs the signal; rank 0 the resume
    stops = sorted({int(s) for s in re.findall(r"\) received: checkpointing at step (\d+)", text)})
    resumes = [tuple(map(int, r)) for r in re.findall(r"resumed from \S+/iter_(\d+) at step (\d+)", text)]
    assert resumes == [(s, s) for s in stops] and len(stops) == restarts, (stops, resumes)
    got = _losses(run_dir)
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))  # every step exactly once
    assert got == want()  # bit-identical: weights, Adam moments, schedule, RNG, data position


def _signals_to_helpers(helpers: list[psutil.Process], timeout_s: float = 120) -> set[str]:
    """The signals that reach the trainers' helpers (they hold them pending) until the helpers end."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = [_pending(proc.pid) for proc in helpers]
        if all(p is None for p in pending):
            return seen
        seen.update(*(p for p in pending if p))
        time.sleep(0.005)
    raise AssertionError(f"the helpers {helpers} did not end within {timeout_s} s (seen: {seen})")


def test_time_limit_signals_requeue_and_resume_exactly(slurm, uninterrupted, packed_prefix, tmp_path):
    log = str(tmp_path / "job.out")
    job_id, run_dir = _submit(
        ["--ntasks=2", "--time=10", "--signal=USR1@120", f"--output={log}"], packed_prefix, tmp_path
    )

    def time_limit(minutes: int) -> None:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)

    def run_seconds() -> int:
        return _seconds(_job(job_id)["RunTime"])

    def requeued(restarts: int) -> None:  # then give the next attempt its 10 minutes back
        def pending() -> bool:
            job = _job(job_id)
            return job["JobState"] == "PENDING" and job["Restarts"] == str(restarts)

        _wait("requeue", pending, job_id, log)
        time_limit(10)

    def trainers(after_step: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
        _wait_for_step(job_id, run_dir, log, after_step)  # past a save: the writer's helpers exist
        tasks = _tasks(run_dir)
        assert len(tasks) == 2, tasks
        return tasks, [child for task in tasks for child in task.children(recursive=True)]

    def last_stop() -> int:
        with open(log) as f:
            return max(int(s) for s in re.findall(r"\) received: checkpointing at step (\d+)", f.read()))

    # The trainers are held (a long step) until Slurm's signals arrive, with a SIGCONT.
    try:
        # 1. The time limit: past it, Slurm sends SIGCONT, SIGUSR1 (the warning, now due) and SIGTERM
        #    to every process of the step (SIGTERM twice: from slurmstepd and through srun), and
        #    SIGTERM to the batch script.
        tasks, helpers = trainers(7)
        for task in tasks:
            task.suspend()
        _wait("a minute", lambda: run_seconds() > 62, job_id, log, 120)
        time_limit(1)
        assert "SIGTERM" in _signals_to_helpers(helpers), "Slurm's time limit skipped the helpers"
        requeued(1)
        # 2. The warning alone (--signal=USR1@120): with 60-120 s left, Slurm's next check (<= 30 s
        #    away) signals every process of the step, the helpers too; the job is still running.
        tasks, helpers = trainers(last_stop() + 6)
        for task in tasks:
            task.suspend()
        time_limit(run_seconds() // 60 + 2)
        assert "SIGUSR1" in _signals_to_helpers(helpers), "Slurm's warning skipped the helpers"
        requeued(2)
        _check_resumed_run(job_id, run_dir, log, uninterrupted, restarts=2)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    with open(log) as f:
        text = f.read()
    assert "DUE TO TIME LIMIT" in text and "SIGTERM: waiting for the trainer to checkpoint" in text


def test_preempted_by_scancel_usr1_requeues_and_resumes_exactly(
    slurm, uninterrupted, packed_prefix, tmp_path
):
    # What a user types: the script's own defaults (whole node, logs/, USR1@300), 2 tasks, no GPU.
    job_id, run_dir = _submit(["--ntasks=2"], packed_prefix, tmp_path)
    log = os.path.join(REPO, "logs", f"longnet-{job_id}.out")
    try:
        _wait_for_step(job_id, run_dir, log, 7)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        _check_resumed_run(job_id, run_dir, log, uninterrupted, restarts=1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    os.remove(log)
