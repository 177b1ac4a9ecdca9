"""Resumption that verifies before it trusts: broken checkpoints are named, skipped, never half-loaded.

Each case damages a copy of a real run's checkpoints (iter_0000002 and iter_0000004, ``latest`` ->
iter_0000004) the way a killed copy, a full disk or a careless hand does, then asks where the run
resumes; one real relaunch checks the whole CLI path, including that every step is logged once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.checkpoint.verify import resume_checkpoint
from tests.train.launching import launch_env, quick_run, read_metrics, train_command

pytestmark = pytest.mark.slow


def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[0]


def _truncate(path: Path, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# case -> (damage, words the warning must hold, the checkpoint resumed from)
DAMAGES = {
    "truncated_shard": (lambda c: _truncate(_shard(c / "iter_0000004")), "bytes, its metadata needs", 2),
    "truncated_common": (
        lambda c: _truncate(c / "iter_0000004" / "common.pt", 50),
        "common.pt is unreadable",
        2,
    ),
    "missing_dcp_metadata": (
        lambda c: (c / "iter_0000004" / ".metadata").unlink(),
        ".metadata is missing",
        2,
    ),
    "truncated_record": (
        lambda c: _truncate(c / "iter_0000004" / "longnet.json", 10),
        "longnet.json is not valid JSON",
        2,
    ),
    "dangling_latest": (lambda c: (c / "latest").write_text("iter_0000099\n"), "names iter_0000099", 4),
    "empty_latest": (lambda c: (c / "latest").write_text(""), "latest is empty", 4),
}


def _damaged_copy(trained_run: str, tmp_path: Path, damage) -> Path:
    target = tmp_path / "checkpoints"
    shutil.copytree(Path(trained_run) / "checkpoints", target)
    damage(target)
    return target


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_complete_checkpoint_naming_the_bad_file(
    case, trained_run, tmp_path, caplog
):
    damage, words, step = DAMAGES[case]
    checkpoints = _damaged_copy(trained_run, tmp_path, damage)
    with caplog.at_level(logging.WARNING):
        chosen = resume_checkpoint(checkpoints)
    assert chosen == checkpoints / f"iter_{step:07d}"
    assert words in caplog.text and "resuming from the newest complete checkpoint" in caplog.text


def test_resume_refuses_when_no_checkpoint_is_complete(trained_run, tmp_path):
    checkpoints = _damaged_copy(
        trained_run, tmp_path, lambda c: [_truncate(_shard(c / n)) for n in ("iter_0000002", "iter_0000004")]
    )
    with pytest.raises(CheckpointError, match="none is complete"):
        resume_checkpoint(checkpoints)


def _run(run_dir: Path, prefix: str, *overrides: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        quick_run(prefix, str(run_dir), *overrides),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **popen,
    )


def _last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_a_relaunch_resumes_past_a_truncated_latest_and_logs_every_step_once(
    trained_run, packed_prefix, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    _truncate(_shard(run_dir / "checkpoints" / "iter_0000004"))
    result = _run(run_dir, packed_prefix, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the newest complete checkpoint" in result.stderr
    assert "resumed from" in result.stderr and "at step 2" in result.stderr
    # Steps 3 and 4 ran twice (before the damage and after the resume): metrics.jsonl holds them once.
    assert [r["step"] for r in read_metrics(str(run_dir))] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_resuming_a_changed_architecture_is_one_line(trained_run, packed_prefix, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    result = _run(run_dir, packed_prefix, "train.steps=6", "model.hidden_size=128")
    assert result.returncode == 1
    line = _last_line(result)
    assert (
        line.startswith("longnet-train: mismatched checkpoint:") and "hidden_size 64 (the run: 128)" in line
    )


def test_weights_only_checkpoints_start_runs_through_init_from_not_load(trained_run, packed_prefix, tmp_path):
    weights = tmp_path / "weights"
    convert = subprocess.run(
        [*train_command()[:1], "-m", "longnet_megatron.export.cli", "reshard", trained_run, str(weights)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert convert.returncode == 0, convert.stdout + convert.stderr
    result = _run(tmp_path / "a", packed_prefix, "train.steps=2", f"checkpoint.load={weights}")
    assert result.returncode == 1
    line = _last_line(result)
    assert "holds weights only" in line and f"checkpoint.init_from={weights}" in line
    result = _run(tmp_path / "b", packed_prefix, "train.steps=2", f"checkpoint.init_from={weights}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised weights from" in result.stderr


def _limit_file_size():
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_save_that_cannot_be_written_is_one_line_and_leaves_nothing_behind(packed_prefix, tmp_path):
    """A file-size limit (EFBIG) stands in for a full disk (ENOSPC): the shard write fails the same way."""
    run_dir = tmp_path / "run"
    result = _run(
        run_dir, packed_prefix, "train.steps=2", "checkpoint.interval=1", preexec_fn=_limit_file_size
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = _last_line(result)
    assert (
        line.startswith("longnet-train: cannot save: saving")
        and "iter_0000001 failed: File too large" in line
    )
    assert sorted(os.listdir(run_dir / "checkpoints")) == []
