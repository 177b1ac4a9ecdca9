"""Single-rank checks: dense equivalence, per-layer patterns, softmax scale, contiguous RoPE, CPU shim,
document masking and per-document RoPE positions."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import DilatedAttentionConfig

from .checks import assert_close, assert_grads_match

pytestmark = pytest.mark.slow


def test_single_full_pattern_equals_dense_causal_sdpa(single_rank):
    dense = single_rank["dense"]
    assert_close(dense["dilated"]["logits"], dense["sdpa"]["logits"], "logits")
    assert_close(dense["dilated"]["loss"], dense["sdpa"]["loss"], "loss")
    assert_grads_match(dense["dilated"]["grads"], dense["sdpa"]["grads"], "dense")


def test_dilated_patterns_differ_from_dense(single_rank):
    """The swap to SDPA takes effect: real dilated patterns are not dense attention."""
    runs = single_rank["dilated"]
    assert (runs["dilated"]["logits"] - runs["sdpa"]["logits"]).abs().max() > 1e-3


def test_per_layer_override_reaches_each_layer(single_rank):
    per_layer = single_rank["per_layer"]
    assert [c.patterns for c in per_layer["sequence"]] == [((32, 1),), ((64, 1), (128, 2), (256, 4))]
    assert [c.patterns for c in per_layer["callable"]] == [((16, 1),), ((32, 1),)]
    assert all(c.causal for c in per_layer["sequence"] + per_layer["callable"])


def test_softmax_scale_follows_megatron(single_rank):
    assert single_rank["softmax_scale"] == {"explicit": 0.5, "default": pytest.approx(1 / 16**0.5)}


def test_rotary_is_sliced_contiguously_by_cp_rank(single_rank):
    full, ranks = single_rank["rotary"]["full"], single_rank["rotary"]["ranks"]
    chunk = full.shape[0] // len(ranks)
    for rank, emb in enumerate(ranks):
        assert_close(emb, full[rank * chunk : (rank + 1) * chunk], f"cp rank {rank}")
    # Megatron's zig-zag would give rank 0 the first and the last chunk: not what LongNet splits.
    assert not torch.equal(ranks[0], torch.cat([full[: chunk // 2], full[-chunk // 2 :]]))


def test_reference_cases_are_distinct_models(references):
    """Guard: the GQA cases really have fewer kv heads (their qkv weights are smaller)."""
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    shapes = {name: tuple(references[name]["state"][qkv].shape) for name in ("mha", "gqa2", "gqa1")}
    assert shapes == {"mha": (192, 64), "gqa2": (128, 64), "gqa1": (96, 64)}


def test_dense_config_is_one_full_pattern():
    assert DilatedAttentionConfig((256,), (1,)).patterns == ((256, 1),)


def test_cpu_shim_maps_cuda_to_cpu_idempotently(single_rank):
    shim = single_rank["shim"]
    assert shim["enabled"]
    assert shim["stack"] == (1, 1)
    assert shim["devices"] == ["cpu"] * 6


def test_cpu_shim_rng_tracker_forks_the_cpu_generator(single_rank):
    shim = single_rank["shim"]
    assert shim["tracker"] == "CpuRNGStatesTracker"
    assert shim["fork_differs"], "inside fork() draws must come from the model-parallel state"
    assert shim["default_restored"], "after fork() the default generator continues where it was"


def test_document_masking_isolates_documents(single_rank):
    """With masking, changing earlier documents' tokens leaves later documents' logits exactly as they
    were; without it, they change."""
    docs = single_rank["documents"]
    assert docs["masked_change"] == 0.0
    assert docs["unmasked_change"] > 1e-3
    assert docs["masked_vs_unmasked"] > 1e-3


def test_reset_position_ids_restart_rope_at_each_document(single_rank):
    """A document's first token gets position 0's angles; within documents only relative positions
    matter to attention, so with masking the logits stay, without it they change."""
    docs = single_rank["documents"]
    assert docs["angles_shape"] == (192, 2, 1, 16)
    assert max(docs["angle_errors"]) < 1e-6
    assert docs["reset_masked_vs_masked"] < 1e-5
    assert docs["reset_unmasked_vs_unmasked"] > 1e-3
