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


def test_synthetic_documents_end_with_eod_and_restart_positions():
    ds = data_lib.SyntheticDataset(4, 300, 1000, seed=1, document_length=40, reset_position_ids=True)
    sample = ds[2]
    tokens, ids, pos = sample["tokens"], sample["document_ids"], sample["position_ids"]
    ends = (tokens == ds.eod).nonzero().squeeze(1)
    assert ds.eod == 999 and 300 // 60 <= len(ends) <= 300 // 20 + 1  # lengths 20 .. 60
    assert torch.equal(ids, torch.cumsum((tokens == ds.eod).long(), 0) - (tokens == ds.eod).long())
    starts = torch.cat([torch.zeros(1, dtype=torch.long), ends + 1])
    assert all(pos[s] == 0 for s in starts.tolist() if s < 300)
    assert torch.equal(pos[1:] - pos[:-1] == 1, ids[1:] == ids[:-1])  # positions count within documents
    plain = data_lib.SyntheticDataset(4, 300, 1000, seed=1, document_length=40)[2]
    assert torch.equal(plain["tokens"], tokens) and torch.equal(plain["position_ids"], torch.arange(300))


def test_packed_data_gives_document_ids_and_megatron_positions(packed_prefix, tmp_path):
    """Real data: ids from the end-of-document tokens agree with the pack's boundaries sidecar, and
    GPTDataset's reset_position_ids restarts positions at the same places."""
    (out,) = run_distributed(
        train_workers.documents_worker, 1, layout=None, args=(packed_prefix, str(tmp_path))
    )
    assert out["checked"] >= 20 and out["boundaries"] > 0  # the samples hold document boundaries
    assert out["mismatch"] == [], out["mismatch"][:3]
