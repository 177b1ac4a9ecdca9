"""Checkpoint and resume: 20 steps straight == N steps, SIGTERM, checkpoint, resume to 20 (same losses)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from longnet_megatron.checkpoint import find_checkpoint
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


def test_sigterm_checkpoint_and_resume_reproduce_the_uninterrupted_run(packed_prefix, tmp_path):
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    env = launch_env()
    straight = subprocess.Popen(
        train_command(*_args(packed_prefix, straight_dir), "checkpoint.save_at_end=false"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupted = subprocess.Popen(
        train_command(*_args(packed_prefix, resumed_dir)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A real SIGTERM (what SLURM sends on preemption) once step 8 is logged; the trainer finishes its
    # step, checkpoints and exits with the requeue code.
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

    # The same command again resumes from `latest` and finishes the run.
    resumed = subprocess.run(
        train_command(*_args(packed_prefix, resumed_dir)),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = straight.communicate(timeout=180)
    assert straight.returncode == 0, err[-3000:]

    want = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(straight_dir)]
    got = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(resumed_dir)]
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    assert got == want  # bit-identical: weights, Adam moments, schedule, RNG and data position restored
    assert str(find_checkpoint(os.path.join(resumed_dir, "checkpoints"))).endswith(f"iter_{STEPS:07d}")
    assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == [
        "iter_0000020",
        "latest",
    ]  # keep_last=1
