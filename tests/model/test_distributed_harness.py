"""run_distributed reports a failing rank's exception with that rank's traceback."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.testing import DistributedWorkerError, ParallelLayout, run_distributed

pytestmark = pytest.mark.slow


def fail_on_rank_one() -> int:
    """Rank 1 raises; rank 0 returns its rank."""
    rank = torch.distributed.get_rank()
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    return rank


def test_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(DistributedWorkerError, match="rank 1 failed") as info:
        run_distributed(fail_on_rank_one, 2, layout=None, timeout_s=120)
    assert info.value.rank == 1
    assert "deliberate failure on rank one" in str(info.value)
    assert "fail_on_rank_one" in str(info.value)  # the rank's own traceback


def test_layout_must_divide_world_size():
    with pytest.raises(ValueError, match="not a multiple"):
        run_distributed(fail_on_rank_one, 3, layout=ParallelLayout(tp=2))
