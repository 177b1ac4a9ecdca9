"""Helpers to launch ``python -m longnet_megatron.train`` for real and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.train.conftest import REPO


def launch_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    # The repository first; a caller's PYTHONPATH after it (e.g. another megatron-core to test against).
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def train_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "longnet_megatron.train",
        os.path.join(REPO, "configs", "tiny_cpu.yaml"),
        *args,
    ]


def quick_run(prefix: str, run_dir: str, *overrides: str) -> list[str]:
    """``train_command`` of a short tiny run: small batches, every step logged, no validation."""
    return train_command(
        f"data.prefixes=[{prefix}]",
        f"run.dir={run_dir}",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        "optim.warmup_steps=1",
        "logging.interval=1",
        "logging.tensorboard=false",
        *overrides,
    )


def read_metrics(run_dir: str, kind: str = "train") -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return [r for r in rows if r["kind"] == kind]


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Block until ``metrics.jsonl`` records ``step`` (the run logs every step)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = read_metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout_s} s")
