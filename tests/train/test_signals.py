"""Exit signals: remembered, not fatal, held for the helpers the trainer starts; start-up and failed saves.

Slurm signals every process of a job step (tests/slurm/ does it for real): the helpers Megatron and
PyTorch start must outlive the signal, or the checkpoint it asks for fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from longnet_megatron.checkpoint import find_checkpoint
from longnet_megatron.train.signals import EXIT_SIGNALS, REQUEUE_EXIT_CODE, ExitSignals
from tests.train.conftest import REPO
from tests.train.launching import launch_env, quick_run, read_metrics, wait_for_step

REPEATS = """
import os, signal
from longnet_megatron.train.signals import ExitSignals
s = ExitSignals().install()
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1):  # Slurm repeats SIGTERM
    os.kill(os.getpid(), sig)
print(s.poll(), flush=True)
"""

# The helpers of a run: Megatron's checkpoint writer (its first save starts a multiprocessing Manager)
# and a DataLoader worker. Each gets SIGUSR1 and SIGTERM, as under Slurm; the next save must work.
HELPERS = """
import json, os, signal, tempfile, time
import psutil
from longnet_megatron.train.signals import ExitSignals

def main():
    signals = ExitSignals().install()
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from longnet_megatron.compat import enable_cpu_megatron
    from longnet_megatron.parallel.layout import free_port

    enable_cpu_megatron()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    root = tempfile.mkdtemp()

    def save(name):
        os.makedirs(os.path.join(root, name))
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(8.0), replica_id=0)}
        dist_checkpointing.save(state, os.path.join(root, name))

    save("first")
    batches = iter(torch.utils.data.DataLoader(range(4), num_workers=1, persistent_workers=True))
    next(batches)
    helpers = psutil.Process().children(recursive=True)
    for proc in helpers:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            proc.send_signal(sig)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(1)
    alive = [p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in helpers]
    save("second")
    result = {"helpers": len(helpers), "alive": alive, "batch": int(next(batches)), "received": signals.poll()}
    print(json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
"""

# A signal-triggered save that breaks half-way (what the dead Manager did): writes a shard, then fails.
FAILING_SAVE = """
import os
import megatron.core.dist_checkpointing as dist_checkpointing
from longnet_megatron.train.cli import main

def save_then_break(state, directory, **kwargs):
    open(os.path.join(directory, "__0_0.distcp"), "w").close()
    raise BrokenPipeError(32, "Broken pipe")

dist_checkpointing.save = save_then_break
main()
"""


def _python(program: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "program.py"  # a file, not -c: spawned children re-import the main module
    path.write_text(program)
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=180, env=launch_env(), cwd=REPO
    )


def test_signals_are_remembered_and_repeats_do_not_kill(tmp_path):
    result = _python(REPEATS, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SIGUSR1"]


def test_handlers_and_signal_mask_are_restored():
    handlers = [signal.getsignal(s) for s in EXIT_SIGNALS]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signals = ExitSignals().install()
    assert set(EXIT_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signals.uninstall()
    assert [signal.getsignal(s) for s in EXIT_SIGNALS] == handlers
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


@pytest.mark.slow
def test_helpers_started_under_exit_signals_outlive_them(tmp_path):
    result = _python(HELPERS, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Python's resource tracker, Megatron's Manager, the DataLoader worker
    assert report["helpers"] >= 3 and all(report["alive"]), report
    assert report["batch"] == 1 and report["received"] == "SIGUSR1"


def _wait_until_blocked(pid: int, sig: signal.Signals, timeout_s: float = 60) -> None:
    """Until process ``pid`` blocks ``sig`` (``longnet-train`` does so before its heavy imports)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        if blocked & (1 << (sig - 1)):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not block {sig.name} within {timeout_s} s")


@pytest.mark.slow
def test_start_up_signal_and_failed_exit_checkpoint_lose_nothing(packed_prefix, tmp_path):
    run_dir = str(tmp_path / "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    env = launch_env()

    def command(steps: int) -> list[str]:
        return quick_run(packed_prefix, run_dir, f"train.steps={steps}", "optim.decay_steps=100")

    first = subprocess.run(command(2), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert find_checkpoint(checkpoints).name == "iter_0000002"

    # A signal during start-up (e.g. a --time shorter than --signal's lead time): exit 75 at once.
    started = subprocess.Popen(
        command(50), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_until_blocked(started.pid, signal.SIGUSR1)
    started.send_signal(signal.SIGUSR1)
    _, err = started.communicate(timeout=180)
    assert started.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "exit signal (SIGUSR1) during start-up" in err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert sorted(os.listdir(checkpoints)) == ["iter_0000002", "latest"]

    # The checkpoint a signal asks for fails: one line, exit 1 (no requeue), `latest` unchanged, no .tmp.
    failing = subprocess.Popen(
        [sys.executable, "-c", FAILING_SAVE, *command(50)[3:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run_dir, 4, failing)
    failing.send_signal(signal.SIGUSR1)
    _, err = failing.communicate(timeout=180)
    assert failing.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("longnet-train:")]
    assert line.startswith("longnet-train: cannot save:") and "Broken pipe" in line, line
    assert sorted(os.listdir(checkpoints)) == ["iter_0000002", "latest"]
    assert find_checkpoint(checkpoints).name == "iter_0000002"


def test_helpers_die_with_a_trainer_killed_outright(packed_prefix, tmp_path):
    """kill -9 gives the trainer no chance to clean up; its watchdog ends Megatron's helper processes."""
    import time

    import psutil

    from tests.train.launching import launch_env, quick_run, read_metrics

    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(
        quick_run(packed_prefix, str(run_dir), "train.steps=500", "checkpoint.interval=1"),
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").exists() or len(read_metrics(str(run_dir))) < 2:
            assert trainer.poll() is None and time.monotonic() < deadline, "the run did not save"
            time.sleep(0.2)
        time.sleep(1.5)  # the watchdog notes the trainer's descendants every second
        helpers = psutil.Process(trainer.pid).children(recursive=True)
        assert len(helpers) >= 2, helpers  # the watchdog and Megatron's checkpoint Manager at least
    finally:
        trainer.kill()
        trainer.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive, f"helpers outlived the trainer: {[p.cmdline()[:3] for p in alive]}"


_FORK_JUST_BEFORE_DEATH = """
import os, sys, time
from longnet_megatron.train.reaper import start_reaper
start_reaper(interval_s=3600)  # its periodic look ran once, at the start: only announcements remain
time.sleep(0.5)
child = os.fork()
if child == 0:
    time.sleep(600)  # a helper that would never end by itself (a Manager waiting for requests)
    os._exit(0)
grandchild_parent = os.fork()
if grandchild_parent == 0:
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    time.sleep(600)
    os._exit(0)
print(child, grandchild_parent, flush=True)
time.sleep(600)
"""


def test_a_helper_forked_just_before_the_kill_dies_too(tmp_path):
    """A process forked after the watchdog's last look announces itself: it and its own forks die
    with the trainer (without the announcement both outlive a kill -9)."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", _FORK_JUST_BEFORE_DEATH], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    time.sleep(0.3)  # the grandchild is forked
    forked = [psutil.Process(pid) for pid in pids]
    forked += forked[1].children()
    assert len(forked) == 3
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(forked, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} forked helpers outlived the trainer"
