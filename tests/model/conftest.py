"""Shared fixtures of the model tests: one 4-rank process group runs every multi-rank check, once.

Spawning ranks that import Megatron costs seconds, so ``model_suite_worker`` (model_workers.py) runs
the references and every parallel layout in one group; the fixtures below hand each test its section
and fail it with the rank's traceback when that section raised.
"""

from __future__ import annotations

import pytest

from longnet_megatron.testing import ParallelLayout, run_distributed

from . import model_workers as workers
from .checks import layout_results, section_of


@pytest.fixture(scope="session")
def suite() -> list[dict]:
    """Per-rank outputs of the 4-rank model suite."""
    return run_distributed(workers.model_suite_worker, workers.WORLD, layout=ParallelLayout(), timeout_s=600)


@pytest.fixture(scope="session")
def references(suite) -> dict:
    """Case name -> TP=1/PP=1 logits, loss, grads, state (and schedule results for 'deep')."""
    return section_of(suite, "references", 0)


@pytest.fixture(scope="session")
def single_rank(suite) -> dict:
    """Single-rank checks (dense equivalence, per-layer patterns, scale, RoPE, shim)."""
    return section_of(suite, "single", 0)


@pytest.fixture(scope="session")
def tensor_parallel(suite) -> list[dict]:
    """TP=2 results of one replica, ordered by TP rank."""
    return sorted(layout_results(suite, "tp2"), key=lambda r: r["tp"])
