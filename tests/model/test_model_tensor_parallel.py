"""TP=2 equals TP=1 on the same weights: logits, loss and every parameter gradient."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.model.state_dict import merge_tensor_parallel_shards, tensor_parallel_dim

from .checks import assert_close, assert_grads_match

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", ["mha", "gqa2", "gqa1"])
def test_tp2_matches_tp1_logits_loss_and_grads(case, tensor_parallel, references):
    ref = references[case]
    ranks = [r[case] for r in tensor_parallel]
    # parallel_output=True: each rank holds its vocabulary shard of the logits.
    assert_close(torch.cat([r["logits"] for r in ranks], dim=-1), ref["logits"], f"{case} logits")
    for r in ranks:
        assert_close(r["loss"], ref["loss"], f"{case} loss")
    assert_grads_match(merge_tensor_parallel_shards([r["grads"] for r in ranks]), ref["grads"], case)
    # Replicated parameters (norms, row-parallel biases) get the full gradient on every rank.
    replicated = [name for name in ref["grads"] if tensor_parallel_dim(name) is None]
    assert replicated, "expected replicated parameters (norms, row-parallel biases)"
    for name in replicated:
        assert_close(ranks[1]["grads"][name], ref["grads"][name], f"{case} rank-1 replicated grad {name}")


@pytest.mark.parametrize("case", ["mha", "gqa2", "gqa1"])
def test_tp_ranks_use_global_head_offsets(case, tensor_parallel):
    for rank, result in enumerate(tensor_parallel):
        for offset, local_heads in result[case]["heads"]:
            assert (offset, local_heads) == (rank * 2, 2)


def test_local_head_offsets_would_change_the_result(tensor_parallel, references):
    """The comparison above is sensitive to the head offset: local offsets give other logits."""
    wrong = torch.cat([r["local_head_offsets"] for r in tensor_parallel], dim=-1)
    assert (wrong - references["mha"]["logits"]).abs().max() > 1e-3
