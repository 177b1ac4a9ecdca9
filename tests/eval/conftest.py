"""Fixtures of the evaluation tests: a small packed dataset and two process groups, run once.

``parallel`` (2 gloo ranks) trains the tiny model for a few steps with data parallelism and the
``eval`` section on, then evaluates its checkpoint under TP=2, PP=2 and CP=2; ``single`` (1 rank)
exports the checkpoint and evaluates the export and the checkpoint in one process, then runs the
command line's error cases. Tests compare the results in the pytest process.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import pytest
from click.testing import CliRunner

from data_prep.cli import main as prep
from longnet_megatron.testing import ParallelLayout, run_distributed

from . import eval_workers as workers


def _prep(*args: str) -> None:
    result = CliRunner().invoke(prep, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, str]:
    """Byte-tokenized standard-library modules packed at L=128 (train / valid), and a cl100k dataset."""
    root = tmp_path_factory.mktemp("eval_data")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]
    _prep("tokenize", *files, "-o", str(root / "lib"), "--tokenizer", "bytes", "-j", "1", "--quiet")
    _prep(
        "pack",
        str(root / "lib"),
        "-o",
        str(root / "packed"),
        "-L",
        str(workers.SEQ),
        "--split",
        "90,10,0",
        "--quiet",
    )
    _prep("tokenize", *files[:3], "-o", str(root / "cl100k"), "-j", "1", "--quiet")
    _prep(
        "pack",
        str(root / "cl100k"),
        "-o",
        str(root / "cl100k_packed"),
        "-L",
        "64",
        "--split",
        "0,1,0",
        "--quiet",
    )
    return {"root": str(root), "packed": str(root / "packed"), "cl100k": str(root / "cl100k_packed")}


@pytest.fixture(scope="session")
def parallel(data) -> list[dict]:
    return run_distributed(workers.parallel_worker, 2, layout=ParallelLayout(), args=(data,), timeout_s=600)


@pytest.fixture(scope="session")
def single(data, parallel) -> dict:
    return run_distributed(workers.single_worker, 1, layout=ParallelLayout(), args=(data,), timeout_s=600)[0]
