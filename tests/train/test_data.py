"""Data: the resumable sampler's order, weighted blends of packed datasets, synthetic tokens."""

from __future__ import annotations

import torch

from longnet_megatron.testing import run_distributed
from longnet_megatron.train import data as data_lib
from tests.train import train_workers


def test_sampler_splits_each_global_batch_over_data_parallel_ranks_and_resumes():
    mbs, dp, gbs = 2, 2, 8  # 2 micro-batches per step
    ranks = [list(data_lib.ResumableBatchSampler(24, 0, mbs, r, dp)) for r in range(dp)]
    step0 = sorted(i for r in ranks for batch in r[:2] for i in batch)
    assert step0 == list(range(gbs))  # a step reads exactly its global batch, whatever the layout
    assert ranks[0][:2] == [[0, 1], [4, 5]] and ranks[1][:2] == [[2, 3], [6, 7]]
    resumed = list(data_lib.ResumableBatchSampler(24, gbs, mbs, 1, dp))
    assert resumed == ranks[1][2:]  # resuming at consumed_samples=8 continues the same sequence


def test_weighted_blend_of_packed_datasets(packed_prefix, tmp_path):
    (out,) = run_distributed(train_workers.blend_worker, 1, layout=None, args=(packed_prefix, str(tmp_path)))
    assert out["train_len"] >= 40 and out["valid"]
    sample = out["sample"]
    assert sample["tokens"].shape == sample["labels"].shape == (128,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels are the next tokens
    assert int(sample["tokens"].max()) <= 256


def test_synthetic_samples_are_a_function_of_the_index():
    ds = data_lib.SyntheticDataset(10, 64, 1000, seed=3)
    a, b = ds[5], data_lib.SyntheticDataset(10, 64, 1000, seed=3)[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ds[4]["tokens"], a["tokens"])
    assert torch.equal(a["tokens"][1:], a["labels"][:-1])
