"""Training under every parallel layout gives the losses of one process (same weights, same samples)."""

from __future__ import annotations

import pytest

from longnet_megatron.testing import run_distributed
from tests.train import train_workers

STEPS = 4
# Global batch 4 of micro-batches of 1: 4 micro-batches on one rank, 2 per rank under DP=2, and a real
# 1F1B schedule (4 micro-batches over 2 stages) under PP=2.
# The vocabulary is padded to a multiple of 64 * tp: fix it so every layout has the same softmax.
COMMON = [
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "optim.warmup_steps=1",
    "model.vocab_size=384",
]
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": [],
    # LongNet's contiguous split: 64 tokens a rank, so the 128- and 256-token patterns cross ranks.
    "cp2": ["parallel.context_parallel_size=2"],
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(packed_prefix, tmp_path_factory) -> dict:
    run_dir = str(tmp_path_factory.mktemp("single"))
    (result,) = run_distributed(
        train_workers.single_process_worker,
        1,
        layout=None,
        args=(packed_prefix, run_dir, COMMON, STEPS),
        threads_per_rank=2,
    )
    return {**result, "run_dir": run_dir}


def test_tiny_loss_falls(single):
    losses = single["falling"]
    assert len(losses) == 30
    assert losses[-1] < losses[0] - 1.0, losses  # ln(320) ~ 5.8 at start; bytes are learnt quickly
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_parallel_layouts_match_one_process(single, packed_prefix, tmp_path):
    results = run_distributed(
        train_workers.layouts_worker,
        2,
        layout=None,
        args=(packed_prefix, str(tmp_path), COMMON, STEPS, LAYOUTS, single["state"]),
    )
    reference = single["reference"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for name in LAYOUTS:
        for rank, per_rank in enumerate(results):
            assert per_rank[name] == pytest.approx(reference, rel=2e-5, abs=2e-5), (name, rank)


def test_weights_saved_by_one_process_initialise_a_tp2_run(single, packed_prefix, tmp_path):
    """checkpoint.init_from loads weights saved in another layout: TP=2 starts from the trained loss."""
    source = single["falling"]
    one_process = single["init"]
    assert one_process[0] < source[0] - 1.0, (one_process, source[:3])  # trained weights, not random
    results = run_distributed(
        train_workers.init_from_run,
        2,
        layout=None,
        args=(
            packed_prefix,
            str(tmp_path / "init_tp2"),
            single["run_dir"] + "/falls",
            ["parallel.tensor_model_parallel_size=2"],
        ),
    )
    for rank, losses in enumerate(results):
        assert losses == pytest.approx(one_process, rel=2e-5, abs=2e-5), rank


def test_pipeline_and_context_parallel_together_match_one_process(single, packed_prefix, tmp_path):
    """PP=2 x CP=2 on 4 ranks: the contiguous CP split inside pipeline stages gives the same losses."""
    layouts = {"pp2cp2": ["parallel.pipeline_model_parallel_size=2", "parallel.context_parallel_size=2"]}
    results = run_distributed(
        train_workers.layouts_worker,
        4,
        layout=None,
        args=(packed_prefix, str(tmp_path), COMMON, STEPS, layouts, single["state"]),
    )
    for rank, per_rank in enumerate(results):
        assert per_rank["pp2cp2"] == pytest.approx(single["reference"], rel=2e-5, abs=2e-5), rank


def test_document_masking_through_pipeline_and_context_parallel(single, packed_prefix, tmp_path):
    """Synthetic documents of ~24 tokens: masked losses under PP=2 x CP=2 (documents crossing the CP
    split, ids on every pipeline stage) equal the unsplit run's and differ from the unmasked ones;
    positions restarting per document leave masked losses as they are (RoPE is relative)."""
    docs = ["data.synthetic=true", "data.synthetic_document_length=24", "model.seq_length=128"]
    masked = [*docs, "data.document_masking=true"]
    pp2cp2 = ["parallel.pipeline_model_parallel_size=2", "parallel.context_parallel_size=2"]
    layouts = {
        "unmasked": docs,
        "masked": masked,
        "masked_pp2cp2": masked + pp2cp2,
        "reset_pp2cp2": [*masked, "data.reset_position_ids=true", *pp2cp2],
    }
    results = run_distributed(
        train_workers.layouts_worker,
        4,
        layout=None,
        args=(packed_prefix, str(tmp_path), COMMON, STEPS, layouts, single["state"]),
    )
    for rank, per_rank in enumerate(results):
        reference = per_rank["masked"]
        assert per_rank["masked_pp2cp2"] == pytest.approx(reference, rel=2e-5, abs=2e-5), rank
        assert per_rank["reset_pp2cp2"] == pytest.approx(reference, rel=2e-5, abs=2e-5), rank
        assert abs(per_rank["unmasked"][0] - reference[0]) > 1e-3, rank
