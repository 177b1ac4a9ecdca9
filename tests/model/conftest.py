"""Shared fixtures of the model tests: one process group per parallel layout, run once per session.

Spawning ranks that import Megatron costs seconds, so each fixture runs one worker that batches many
checks (see model_workers.py) and the tests assert on its results.
"""

from __future__ import annotations

import model_workers as workers
import pytest
import torch

from longnet_megatron.testing import ParallelLayout, run_distributed

# fp32 on CPU: parallel layouts only reorder sums (all-reduce, sharded matmuls).
FP32 = {"rtol": 1e-4, "atol": 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close with the fp32 tolerance and a message naming the tensor."""
    torch.testing.assert_close(actual, expected, **FP32, msg=lambda m: f"{what}: {m}")


def assert_grads_match(actual: dict, expected: dict, what: str) -> None:
    """Same parameter names, each gradient equal within fp32 tolerance."""
    assert sorted(actual) == sorted(expected), f"{what}: parameter sets differ"
    for name in expected:
        assert_close(actual[name], expected[name], f"{what} grad {name}")


@pytest.fixture(scope="session")
def single_rank() -> dict:
    """References (TP=1, PP=1) of every case and the single-rank checks."""
    return run_distributed(workers.single_rank_worker, 1, layout=ParallelLayout())[0]


@pytest.fixture(scope="session")
def references(single_rank) -> dict:
    """Case name -> reference logits, loss, grads, state (and schedule results for 'deep')."""
    return single_rank["cases"]


@pytest.fixture(scope="session")
def tensor_parallel(references) -> list[dict]:
    """Per-rank results of the TP=2 worker."""
    states = {name: references[name]["state"] for name in ("mha", "gqa2", "gqa1")}
    return run_distributed(workers.tensor_parallel_worker, 2, layout=ParallelLayout(tp=2), args=(states,))
