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


H200 = 143_771 * 2**20  # torch's total_memory of an H200, in bytes


def test_one_h200_at_1m_plans_chunked_mlp_and_the_fewest_offloaded_inputs():
    x = inputs("1.3b", 1 << 20)
    assert peak_footprint(x, FULL).total > usable_bytes(H200)  # full recompute alone does not fit
    chunked = Recompute("full", "uniform", 1, AUTO_MLP_CHUNK_TOKENS)
    assert peak_footprint(x, chunked).total > usable_bytes(H200)  # nor with the MLP chunked
    plan = plan_recompute(x, H200, host_bytes=200 * GIB)
    k = plan.recompute.offload_layers
    assert plan.recompute == Recompute("full", "uniform", 1, AUTO_MLP_CHUNK_TOKENS, k) and 0 < k < 24
    assert plan.fits and plan.footprint.total <= usable_bytes(H200)
    fewer = dataclasses.replace(plan.recompute, offload_layers=k - 1)
    assert peak_footprint(x, fewer).total > usable_bytes(H200)  # k is the least that fits
    assert plan.offloaded_bytes == k * 2 * 2048 * (1 << 20)  # 2 bytes x h per token and layer
    line = plan.describe()
    assert line.startswith(
        f"recompute full (uniform, 1 layer) + MLP in 64K-token chunks + {k} layer inputs offloaded "
        f"({k * 4:.1f} GiB host): modelled peak"
    )
    # The chunked MLP keeps one 64K chunk's fc1/GeLU outputs of the 32 GiB, at one more MLP forward
    # per layer; offloading costs no FLOPs.
    saved = peak_footprint(x, FULL).total - peak_footprint(x, chunked).total
    assert 25 * GIB < saved < 32 * GIB
    mlp_forward = x.tokens * 4 * 2048 * 8192
    assert recompute_flops(x, chunked) - recompute_flops(x, FULL) == pytest.approx(24 * mlp_forward)
    assert recompute_flops(x, plan.recompute) == recompute_flops(x, chunked)


def test_offloading_within_the_host_budget_only():
    x = inputs("1.3b", 1 << 20)
    generous = plan_recompute(x, H200, host_bytes=200 * GIB)
    k = generous.recompute.offload_layers
    exact = plan_recompute(x, H200, host_bytes=k * 4 * GIB)
    assert exact.recompute == generous.recompute and exact.fits
    tiny = plan_recompute(x, H200, host_bytes=8 * GIB)  # two layer inputs
    assert not tiny.fits and tiny.recompute.offload_layers == 2 and tiny.offloaded_bytes <= 8 * GIB
    assert (
        "DOES NOT FIT" in tiny.describe()
        and "host budget for offloaded layer inputs 8.0 GiB" in tiny.describe()
    )


def test_128k_on_one_h200_is_unchanged_and_no_option_without_its_conditions():
    assert plan_recompute(inputs("1.3b", 131072), H200, host_bytes=8 * GIB).recompute == block(15)
    # A sequence no longer than the chunk gains nothing from chunking: not a candidate.
    assert all(not r.mlp_chunk_tokens for r in candidates(inputs("1.3b", 65536)))
    # FP8: neither the chunked MLP nor offloading; pipeline parallel: no offloading; 0: no chunks.
    assert all(
        not r.mlp_chunk_tokens and not r.offload_layers for r in candidates(inputs("1.3b", 1 << 20, fp8=True))
    )
    assert all(not r.offload_layers for r in candidates(inputs("1.3b", 1 << 20, pp=2)))
    assert any(r.mlp_chunk_tokens for r in candidates(inputs("1.3b", 1 << 20, pp=2)))
    no_chunks = candidates(inputs("1.3b", 1 << 20, mlp_chunk_tokens=0))
    assert all(not r.mlp_chunk_tokens for r in no_chunks) and no_chunks[-1].offload_layers == 24
    # A given chunk size is in every candidate.
    assert all(r.mlp_chunk_tokens == 4096 for r in candidates(inputs("1.3b", 1 << 20, mlp_chunk_tokens=4096)))


def test_the_new_settings_map_to_fields_and_are_modelled():
    chunked = Recompute("full", "block", 20, 65536, 3)
    assert chunked.config_fields() == {
        "mlp_chunk_tokens": 65536,
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 20,
    }
    assert Recompute(mlp_chunk_tokens=4096).config_fields() == {"mlp_chunk_tokens": 4096}
    assert str(chunked) == "block (20 layers) + MLP in 64K-token chunks + 3 layer inputs offloaded"
    assert Recompute("full", "uniform", 2).checkpointed_inputs(24) == 12
    # Without recomputation the chunked MLP frees every layer's fc1/GeLU outputs.
    x = inputs("1.3b", 131072)
    freed = (
        peak_footprint(x, NONE).activations - peak_footprint(x, Recompute(mlp_chunk_tokens=65536)).activations
    )
    assert freed == pytest.approx(24 * 131072 * 4 * 8192)
    # Each offloaded input is 2 h bytes a token off the GPU, until only the rebuilt layer's is left.
    y = inputs("1.3b", 1 << 20)
    totals = [peak_footprint(y, Recompute("full", "uniform", 1, 65536, k)).total for k in range(24)]
    assert all(a - b == pytest.approx(4 * GIB) for a, b in zip(totals[:23], totals[1:23]))


def test_explicit_new_settings_from_the_job_are_modelled():
    job = resolve_job(
        load_config(
            None,
            [
                "data.synthetic=true",
                "train.precision=bf16",
                "model.preset=1.3b",
                "model.seq_length=1048576",
                "model.recompute=full",
                "model.mlp_chunk_tokens=65536",
                "model.offload_layer_inputs=16",
            ],
        ),
        world_size=1,
    )
    plan = plan_for_job(job, 4096, device_bytes=H200, host_bytes=200 * GIB)
    assert plan.recompute == Recompute("full", "uniform", 1, 65536, 16)
    assert (
        plan.offloaded_bytes == 16 * 4 * GIB
        and "16 layer inputs offloaded (64.0 GiB host)" in plan.describe()
    )
    assert not plan_for_job(job, 4096, device_bytes=H200, host_bytes=32 * GIB).fits
    assert plan_for_job(job, 4096, device_bytes=None).recompute == plan.recompute  # CPU: as given
    auto = resolve_job(
        load_config(
            None,
            ["data.synthetic=true", "train.precision=bf16", "model.preset=1.3b", "model.seq_length=1048576"],
        ),
        1,
    )
    planned = plan_for_job(auto, 4096, device_bytes=H200, host_bytes=200 * GIB)
    assert planned.recompute.offload_layers > 0 and planned.recompute.mlp_chunk_tokens == 65536
    assert plan_for_job(auto, 4096, device_bytes=None).recompute == NONE


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.offload_layer_inputs=2"], "model.recompute=auto: the planner chooses it"),
        (["model.recompute=selective", "model.offload_layer_inputs=2"], "needs model.recompute=full"),
        (["model.recompute=full", "model.offload_layer_inputs=3"], "saves 2 layer inputs of 2 layers"),
        (
            ["model.recompute=full", "model.recompute_method=block", "model.offload_layer_inputs=2"],
            "saves 1 layer inputs",
        ),
        (["model.mlp_chunk_tokens=-1"], "model.mlp_chunk_tokens=-1 must be >= 0"),
        (["model.offload_layer_inputs=-1"], "model.offload_layer_inputs=-1 must be >= 0"),
        (
            ["model.mlp_chunk_tokens=64", "model.fp8=delayed", "train.precision=bf16"],
            "model.mlp_chunk_tokens=64 with model.fp8=delayed",
        ),
    ],
)
def test_the_new_options_are_checked(overrides, message):
    from longnet_megatron.train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_job(load_config(None, ["data.synthetic=true", *overrides]), world_size=1)


def test_offloading_needs_one_pipeline_stage():
    from longnet_megatron.train.config import ConfigError

    overrides = [
        "model.recompute=full",
        "model.offload_layer_inputs=1",
        "parallel.pipeline_model_parallel_size=2",
    ]
    with pytest.raises(ConfigError, match="one pipeline stage only"):
        resolve_job(load_config(None, ["data.synthetic=true", *overrides]), world_size=2)


def test_a_planned_config_carries_the_chunk_to_the_model():
    from longnet_megatron.train.model import transformer_config

    auto = resolve_job(load_config(None, ["data.synthetic=true"]), world_size=1)
    config = transformer_config(auto, recompute=Recompute("full", "uniform", 1, 128, 1))
    assert config.mlp_chunk_tokens == 128 and config.recompute_granularity == "full"
    assert transformer_config(auto).mlp_chunk_tokens is None


def test_the_1m_one_gpu_plan_is_the_one_measured_and_models_its_peak_conservatively():
    """benchmarks/train_h200.json, fifth session: 1.3b at 1M trained on one H200 with the plan made
    here today, and the modelled peak is above the measured one (never optimistic), by under 15%."""
    with open(os.path.join(REPO, "benchmarks", "train_h200.json")) as f:
        row = json.load(f)["session5_1m_fa4"]["rows"][0]
    assert (row["preset"], row["context"], row["status"]) == ("1.3b", 1 << 20, "ok")
    plan = plan_recompute(inputs("1.3b", 1 << 20), H200, host_bytes=200 * GIB)
    assert plan.describe().startswith(f"recompute {row['recompute']} (")
    modelled = plan.footprint.total / GIB
    assert modelled == pytest.approx(row["modelled_gib"], rel=1e-3)
    assert row["peak_gib"] <= modelled < 1.15 * row["peak_gib"]
