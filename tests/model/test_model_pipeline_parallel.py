"""Pipeline parallelism through Megatron's schedules equals PP=1: loss and gradients.

Layouts: PP=2, PP=2 with two virtual stages (4 layers: one per chunk), and TP=2 x PP=2 on 4 ranks.
Embeddings are tied, so the word-embedding gradient is the sum of the first stage's (input) and the
last stage's (output layer) parts, as Megatron's finalize_model_grads would all-reduce them.
"""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.model.state_dict import merge_tensor_parallel_shards

from .checks import assert_close, assert_grads_match, layout_results

pytestmark = pytest.mark.slow

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def unshard_pipeline_grads(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Rank results of one layout -> one unsharded gradient dict with tied embeddings summed."""
    by_stage: dict[int, list[dict]] = {}
    for r in sorted(ranks, key=lambda r: (r["pp"], r["tp"])):
        by_stage.setdefault(r["pp"], []).append(r["grads"])
    grads: dict[str, torch.Tensor] = {}
    for stage_grads in by_stage.values():
        for name, grad in merge_tensor_parallel_shards(stage_grads).items():
            grads[name] = grads[name] + grad if name in grads else grad
    if OUTPUT in grads:
        grads[EMBEDDING] = grads[EMBEDDING] + grads.pop(OUTPUT)
    return grads


def check_layout(results: list[dict], key: str, reference: dict) -> None:
    last = [r for r in results if r["loss"] is not None]
    assert last, "no rank computed the loss"
    for r in last:
        assert_close(r["loss"], reference["loss"], f"{key} loss")
        assert_close(torch.stack(r["micro"]), torch.stack(reference["micro"]), f"{key} micro-batch losses")
    assert_grads_match(unshard_pipeline_grads(results), reference["grads"], key)


def stage_layers(results: list[dict]) -> list:
    """Global layer indices per pipeline rank (TP rank 0), per virtual chunk."""
    return [r["layers"] for r in sorted(results, key=lambda r: r["pp"]) if r["tp"] == 0]


def test_pp2_matches_pp1(suite, references):
    results = layout_results(suite, "pp2")
    assert stage_layers(results) == [[[0, 1]], [[2, 3]]]
    check_layout(results, "pp2", references["deep"]["schedule"])


def test_pp2_with_virtual_stages_matches_pp1(suite, references):
    results = layout_results(suite, "pp2_vpp2")
    assert stage_layers(results) == [[[0], [2]], [[1], [3]]]
    check_layout(results, "pp2_vpp2", references["deep"]["schedule"])


def test_tp2_pp2_on_four_ranks_matches_single_rank(suite, references):
    results = layout_results(suite, "tp2_pp2")
    assert sorted((r["tp"], r["pp"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    check_layout(results, "tp2_pp2", references["deep"]["schedule"])


def test_schedule_reference_agrees_with_direct_backward(references):
    """PP=1 through the schedule is a mean over micro-batches: finite and with every parameter's grad."""
    schedule = references["deep"]["schedule"]
    assert torch.isfinite(schedule["loss"])
    assert sorted(schedule["grads"]) == sorted(references["deep"]["grads"])
