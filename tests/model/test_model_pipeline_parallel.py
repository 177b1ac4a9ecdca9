"""Pipeline parallelism through Megatron's schedules equals PP=1: loss and gradients.

Layouts: PP=2, PP=2 with two virtual stages (4 layers: one per chunk), and TP=2 x PP=2 on 4 ranks.
Embeddings are tied, so the word-embedding gradient is the sum of the first stage's (input) and the
last stage's (output layer) parts, as Megatron's finalize_model_grads would all-reduce them.
"""

from __future__ import annotations

import model_workers as workers
import pytest
import torch
from conftest import assert_close, assert_grads_match

from longnet_megatron.model.state_dict import merge_tensor_parallel_shards
from longnet_megatron.testing import ParallelLayout, run_distributed

pytestmark = pytest.mark.slow

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def unshard_pipeline_grads(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Rank results of one layout -> one unsharded gradient dict with tied embeddings summed."""
    by_stage: dict[int, list[dict]] = {}
    for r in sorted(ranks, key=lambda r: (r["pp_rank"], r["tp_rank"])):
        by_stage.setdefault(r["pp_rank"], []).append(r["grads"])
    grads: dict[str, torch.Tensor] = {}
    for stage_grads in by_stage.values():
        for name, grad in merge_tensor_parallel_shards(stage_grads).items():
            grads[name] = grads[name] + grad if name in grads else grad
    if OUTPUT in grads:
        grads[EMBEDDING] = grads[EMBEDDING] + grads.pop(OUTPUT)
    return grads


@pytest.fixture(scope="module")
def pp2(references):
    layouts = [ParallelLayout(pp=2), ParallelLayout(pp=2, vpp=2)]
    return run_distributed(
        workers.pipeline_worker, 2, layout=layouts[0], args=(references["deep"]["state"], layouts)
    )


@pytest.fixture(scope="module")
def tp2pp2(references):
    layouts = [ParallelLayout(tp=2, pp=2)]
    return run_distributed(
        workers.pipeline_worker, 4, layout=layouts[0], args=(references["deep"]["state"], layouts)
    )


def check_layout(ranks: list[dict], key: str, reference: dict) -> None:
    results = [r[key] for r in ranks]
    last = [r for r in results if r["loss"] is not None]
    assert last, "no rank computed the loss"
    for r in last:
        assert_close(r["loss"], reference["loss"], f"{key} loss")
        assert_close(torch.stack(r["micro"]), torch.stack(reference["micro"]), f"{key} micro-batch losses")
    assert_grads_match(unshard_pipeline_grads(results), reference["grads"], key)


def test_pp2_matches_pp1(pp2, references):
    check_layout(pp2, "pp2_vppNone_tp1", references["deep"]["schedule"])
    assert [r["pp2_vppNone_tp1"]["layers"] for r in pp2] == [[[0, 1]], [[2, 3]]]


def test_pp2_with_virtual_stages_matches_pp1(pp2, references):
    check_layout(pp2, "pp2_vpp2_tp1", references["deep"]["schedule"])
    assert [r["pp2_vpp2_tp1"]["layers"] for r in pp2] == [[[0], [2]], [[1], [3]]]


def test_tp2_pp2_on_four_ranks_matches_single_rank(tp2pp2, references):
    check_layout(tp2pp2, "pp2_vppNone_tp2", references["deep"]["schedule"])


def test_schedule_reference_agrees_with_direct_backward(references):
    """PP=1 through the schedule is a mean over micro-batches: finite and with every parameter's grad."""
    schedule = references["deep"]["schedule"]
    assert torch.isfinite(schedule["loss"])
    assert sorted(schedule["grads"]) == sorted(references["deep"]["grads"])
