"""The memory planner: its footprint model against measured GPU peaks, and its choices for fake devices."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.model.presets import get_preset
from longnet_megatron.train.config import load_config
from longnet_megatron.train.job import resolve_job
from longnet_megatron.train.memory_plan import (
    AUTO_MLP_CHUNK_TOKENS,
    FULL,
    GIB,
    NONE,
    SELECTIVE,
    MemoryInputs,
    Recompute,
    block,
    candidates,
    layer_parameters,
    peak_footprint,
    plan_for_job,
    plan_recompute,
    recompute_flops,
    static_bytes,
    usable_bytes,
)
from tests.train.conftest import REPO


def inputs(preset: str, n: int, *, base_segment: int = 2048, **changes) -> MemoryInputs:
    """tools/bench_train.py's configuration: patterns w_k = 2048 * 2^k, r_k = 2^k up to n, chunked loss."""
    p = get_preset(preset)
    patterns = DilatedAttentionConfig.geometric(min(base_segment, n), num_patterns=64, max_segment=n)
    x = MemoryInputs(
        num_layers=p.num_layers,
        hidden_size=p.hidden_size,
        ffn_hidden_size=4 * p.hidden_size,
        num_heads=p.num_attention_heads,
        kv_heads=p.num_attention_heads,
        padded_vocab_size=p.padded_vocab_size(1),
        tie_embeddings=p.tie_embeddings,
        seq_length=n,
        patterns=tuple(patterns.patterns),
        loss_chunk_tokens=4096,
    )
    return dataclasses.replace(x, **changes)


def measured_peaks() -> list[tuple[str, int, int, Recompute, float]]:
    """(preset, L, cp, recompute, peak GiB) of every LongNet row in benchmarks/train.json, and the
    1.3b 1M CP=4 run of benchmarks/train_1b_1m_cp4.log (steady state, 60.14 GiB a GPU)."""
    with open(os.path.join(REPO, "benchmarks", "train.json")) as f:
        rows = json.load(f)["rows"]
    peaks = [
        (r["preset"], r["context"], 1, NONE if r["recompute"] == "none" else FULL, r["peak_gib"])
        for r in rows
        if r["kind"] == "longnet" and r["status"] == "ok"
    ]
    return [*peaks, ("1.3b", 1 << 20, 4, FULL, 60.14)]


def test_the_footprint_model_reproduces_the_measured_peaks():
    peaks = measured_peaks()
    assert len(peaks) >= 6
    for preset, n, cp, recompute, gib in peaks:
        modelled = peak_footprint(inputs(preset, n, cp=cp), recompute).total / GIB
        assert abs(modelled / gib - 1) < 0.03, (preset, n, cp, str(recompute), modelled, gib)


def test_parameters_per_rank_match_the_built_model():
    from longnet_megatron.model import build_longnet_gpt, make_longnet_config
    from longnet_megatron.parallel.layout import init_single_process

    init_single_process()
    preset = get_preset("tiny")
    model = build_longnet_gpt(preset, config=make_longnet_config(preset), use_te=False)
    built = sum(p.numel() for p in model.parameters())
    x = inputs("tiny", preset.seq_length, base_segment=64)
    modelled = (
        preset.num_layers * layer_parameters(x) + x.padded_vocab_size * x.hidden_size + 2 * x.hidden_size
    )
    assert modelled == built
    # bf16 with the distributed optimizer over 4 replicas: 2 + 4 + 12 / 4 bytes a parameter.
    assert static_bytes(dataclasses.replace(x, dp=4), stage=0) == built * 9


def test_the_plan_is_the_cheapest_setting_that_fits():
    x = inputs("1.3b", 131072)
    none, full = peak_footprint(x, NONE).total, peak_footprint(x, FULL).total
    assert full < none
    # A device on which nothing needs recomputing, one on which nothing fits, and every size between.
    assert plan_recompute(x, (none + 2 * GIB) / 0.9 + GIB).recompute == NONE
    # When nothing fits: the smallest footprint, full recompute with the MLP chunked and 23 of 24 layer
    # inputs offloaded (no host limit given; the last layer's input is on the GPU while it is rebuilt
    # either way, so offloading the 24th saves nothing at the peak).
    hopeless = plan_recompute(x, (full / 2 + 2 * GIB) / 0.9)
    smallest = Recompute("full", "uniform", 1, AUTO_MLP_CHUNK_TOKENS, 23)
    assert hopeless.recompute == smallest and not hopeless.fits and "DOES NOT FIT" in hopeless.describe()
    order = candidates(x)
    assert order[0] == NONE and order[-1].offload_layers == 24 and FULL in order
    assert [recompute_flops(x, r) for r in order] == sorted(recompute_flops(x, r) for r in order)
    for device_gib in (60, 80, 100, 141, 200):
        device = device_gib * GIB
        plan = plan_recompute(x, device)
        assert plan.fits and plan.footprint.total <= usable_bytes(device)
        cheaper = [r for r in order if recompute_flops(x, r) < recompute_flops(x, plan.recompute)]
        assert all(peak_footprint(x, r).total > usable_bytes(device) for r in cheaper), device_gib
        assert "memory plan" not in plan.describe() and f"{device_gib:.1f} GiB device" in plan.describe()


def test_block_recompute_saves_memory_layer_by_layer_and_selective_little():
    x = inputs("1.3b", 131072)
    totals = [peak_footprint(x, block(k)).total for k in range(1, 24)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    assert totals[-1] >= peak_footprint(x, FULL).total
    # The dilated attention keeps q, k, v, its output and the log-sum-exp: recomputing it frees only
    # the log-sum-exp (plus the output copy when mbs > 1), far less than one recomputed layer.
    saved_selective = peak_footprint(x, NONE).total - peak_footprint(x, SELECTIVE).total
    saved_block = peak_footprint(x, NONE).total - peak_footprint(x, block(1)).total
    assert 0 < saved_selective < saved_block / 20
    # On a device where selective is just enough, the plan takes the cheaper of it and one layer's
    # recompute. Dilated attention is a quarter or more of a layer's FLOPs at any length, so
    # recomputing it in 24 layers costs more than one whole layer; with one layer a stage it costs less.
    for layers, pp, expected in ((24, 1, block(1)), (2, 2, SELECTIVE)):
        x = dataclasses.replace(inputs("1.3b", 131072), num_layers=layers, pp=pp)
        assert (recompute_flops(x, SELECTIVE) < recompute_flops(x, block(1))) == (expected == SELECTIVE)
        device = (peak_footprint(x, SELECTIVE).total + 2 * GIB) / 0.9 + 1
        assert peak_footprint(x, NONE).total > usable_bytes(device)
        assert plan_recompute(x, device).recompute == expected, layers


def test_pipeline_parallel_first_stage_holds_the_micro_batches_in_flight():
    x = inputs("1.3b", 32768, pp=4, num_microbatches=8)
    one = inputs("1.3b", 32768, pp=4, num_microbatches=1)
    first, last = peak_footprint(x, NONE), peak_footprint(one, NONE)
    assert first.activations > 3.5 * last.activations  # four micro-batches in flight on stage 0
    assert candidates(x)[-2] == block(5)  # 6 layers a stage: blocks of 1..5, then full


def test_tensor_and_sequence_parallelism_split_activations():
    base = peak_footprint(inputs("1.3b", 32768), NONE).activations
    tp = peak_footprint(inputs("1.3b", 32768, tp=2), NONE).activations
    sp = peak_footprint(inputs("1.3b", 32768, tp=2, sequence_parallel=True), NONE).activations
    assert base / 2 < tp < base and sp == pytest.approx(base / 2)


def test_recompute_settings_map_to_megatron_fields():
    assert NONE.config_fields() == {}
    assert SELECTIVE.config_fields() == {
        "recompute_granularity": "selective",
        "recompute_modules": ["core_attn"],
    }
    assert block(3).config_fields() == {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 3,
    }
    assert str(block(3)) == "block (3 layers)" and str(FULL) == "full (uniform, 1 layer)"


def test_the_job_plan_on_cpu_and_megatron_accepts_a_planned_config():
    from longnet_megatron.train.model import transformer_config

    auto = resolve_job(load_config(None, ["data.synthetic=true"]), world_size=1)
    assert auto.config.model.recompute == "auto"
    plan = plan_for_job(auto, None, device_bytes=None)
    assert plan.recompute == NONE and plan.fits and "no GPU" in plan.describe()
    explicit = resolve_job(
        load_config(None, ["data.synthetic=true", "model.recompute=full", "model.recompute_method=block"]), 1
    )
    assert plan_for_job(explicit, None, None).recompute == Recompute("full", "block", 1)
    on_gpu = plan_for_job(auto, None, device_bytes=80 * GIB)
    assert on_gpu.recompute == NONE and on_gpu.footprint.total < GIB
    config = transformer_config(auto, recompute=block(1))  # Megatron's own checks run here
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "full",
        "block",
        1,
    )
