"""The training batch split for LongNet's context parallelism is contiguous (not Megatron's zig-zag)."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.parallel.batch import split_batch_for_context_parallel


def _batch(b=2, s=12):
    tokens = torch.arange(b * s).view(b, s)
    return {
        "tokens": tokens,
        "labels": tokens + 1,
        "loss_mask": torch.ones(b, s),
        "position_ids": torch.arange(s).expand(b, -1),
        "attention_mask": torch.ones(b, 1, s, s, dtype=torch.bool),
        "extra": None,
    }


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_are_contiguous_and_cover_the_sequence(cp):
    batch = _batch()
    parts = [split_batch_for_context_parallel(batch, c, cp) for c in range(cp)]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])
    n = 12 // cp
    for c, part in enumerate(parts):
        assert part["position_ids"][0].tolist() == list(range(c * n, (c + 1) * n))
        assert part["attention_mask"].shape == (2, 1, n, 12)
        assert part["extra"] is None


def test_length_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="divisible"):
        split_batch_for_context_parallel(_batch(s=10), 0, 4)
