"""Shared fixtures of the training tests: a small packed dataset built once per session."""

from __future__ import annotations

import glob
import os
import subprocess
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 128  # short sequences keep multi-process runs fast; the tiny patterns still end partial


@pytest.fixture(scope="session")
def packed_prefix(tmp_path_factory) -> str:
    """``longnet-prep`` output (byte tokenizer, L=128) of a few standard-library modules."""
    from data_prep.pack import pack_datasets
    from data_prep.tokenize_corpus import tokenize_corpus

    root = tmp_path_factory.mktemp("data")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:40]
    tokenize_corpus(
        files, str(root / "lib"), tokenizer="bytes", workers=1, progress=False, log=lambda m: None
    )
    pack_datasets([str(root / "lib")], str(root / "packed"), seq_length=SEQ, split="95,5,0", progress=False)
    return str(root / "packed")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, packed_prefix) -> str:
    """A run directory with checkpoints iter_0000002 and iter_0000004 of the tiny CPU model."""
    from tests.train.launching import launch_env, quick_run

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = subprocess.run(
        quick_run(
            packed_prefix, str(run_dir), "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=0"
        ),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return str(run_dir)


@pytest.fixture(scope="session")
def real_checkpoint(trained_run) -> str:
    return f"{trained_run}/checkpoints/iter_0000004"
