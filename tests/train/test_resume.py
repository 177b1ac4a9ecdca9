"""Checkpoint and resume: 20 steps straight == N steps, SIGTERM, checkpoint, resume to 20 (same losses),
with saves written in place and in the background (checkpoint.async_save)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from longnet_megatron.checkpoint import find_checkpoint
from longnet_megatron.checkpoint.files import partial_saves
from longnet_megatron.checkpoint.record import read_metadata
from longnet_megatron.train.signals import REQUEUE_EXIT_CODE
from tests.train.launching import launch_env, read_metrics, train_command, wait_for_step

pytestmark = pytest.mark.slow
STEPS = 20


def _args(prefix: str, run_dir: str) -> list[str]:
    return [
        f"data.prefixes=[{prefix}]",
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        "optim.warmup_steps=3",
        "logging.interval=1",
        "logging.tensorboard=false",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
    ]


@pytest.fixture(scope="module")
def straight_losses(packed_prefix, tmp_path_factory):
    """The uninterrupted run, started once in the background; call it for its (step, loss, lr) list."""
    run_dir = str(tmp_path_factory.mktemp("straight"))
    proc = subprocess.Popen(
        train_command(*_args(packed_prefix, run_dir), "checkpoint.save_at_end=false"),
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    done: list = []

    def losses() -> list[tuple]:
        if not done:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            done.append([(r["step"], r["loss"], r["lr"]) for r in read_metrics(run_dir)])
        return done[0]

    yield losses
    if proc.poll() is None:
        proc.kill()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_sigterm_checkpoint_and_resume_reproduce_the_uninterrupted_run(
    packed_prefix, tmp_path, straight_losses, async_save
):
    resumed_dir = str(tmp_path / "resumed")
    env = launch_env()
    # async: saves every 3 steps written in the background while training goes on (checkpoint.async_save).
    extra = ["checkpoint.async_save=true", "checkpoint.interval=3"] if async_save else []
    interrupted = subprocess.Popen(
        train_command(*_args(packed_prefix, resumed_dir), *extra),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A real SIGTERM (what SLURM sends on preemption) once step 8 is logged; the trainer finishes its
    # step, checkpoints (waiting for any background save first) and exits with the requeue code.
    wait_for_step(resumed_dir, 8, interrupted)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=180)
    assert interrupted.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    stopped_at = read_metrics(resumed_dir)[-1]["step"]
    assert 8 <= stopped_at < STEPS, "the signal came too late to test a resume"
    checkpoint = find_checkpoint(os.path.join(resumed_dir, "checkpoints"))
    assert checkpoint.name == f"iter_{stopped_at:07d}"
    meta = read_metadata(checkpoint)
    assert meta["step"] == stopped_at and not meta["weights_only"]
    assert meta["longnet_model"]["tokenizer"] == {"kind": "bytes"}
    assert meta["job"]["train"]["steps"] == STEPS
    assert "memory plan: recompute none (no GPU" in err
    if async_save:
        assert "saving checkpoint" in err and "in the background" in err
        assert f"saved checkpoint {checkpoint}" in err  # committed before the requeue exit
        assert not partial_saves(os.path.join(resumed_dir, "checkpoints"))

    # The same command again resumes from `latest` and finishes the run.
    resumed = subprocess.run(
        train_command(*_args(packed_prefix, resumed_dir), *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(resumed_dir)]
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    assert got == straight_losses()  # bit-identical: weights, Adam moments, schedule, RNG, data position
    assert str(find_checkpoint(os.path.join(resumed_dir, "checkpoints"))).endswith(f"iter_{STEPS:07d}")
    assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == [
        "iter_0000020",
        "latest",
    ]  # keep_last=1
