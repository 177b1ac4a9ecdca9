"""Shared fixtures of the training tests: a small packed dataset built once per session."""

from __future__ import annotations

import glob
import os
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
