"""In-process unit tests: presets, LongNetConfig, layer specs, state-dict layout helpers."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pickle

import pytest
import torch
from megatron.core.config_logger import JSONEncoderWithMcoreTypes
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.model import (
    PRESETS,
    LongNetConfig,
    get_longnet_layer_spec,
    get_preset,
    make_longnet_config,
)
from longnet_megatron.model.core_attention import DilatedCoreAttention
from longnet_megatron.model.specs import transformer_engine_available
from longnet_megatron.model.state_dict import (
    merge_tensor_parallel_shards,
    rename_local_to_te,
    shard_for_tensor_parallel,
    tensor_parallel_dim,
)
from longnet_megatron.parallel.layout import contiguous_cp_chunk

GPT3 = {  # name: (layers, hidden, heads)
    "125m": (12, 768, 12),
    "350m": (24, 1024, 16),
    "760m": (24, 1536, 16),
    "1.3b": (24, 2048, 16),
    "2.7b": (32, 2560, 32),
}


@pytest.mark.parametrize("name", sorted(GPT3))
def test_presets_have_gpt3_shapes_and_geometric_patterns(name):
    preset = get_preset(name)
    assert (preset.num_layers, preset.hidden_size, preset.num_attention_heads) == GPT3[name]
    assert preset.dilated_attention.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert preset.dilated_attention.dilation_rates == (1, 2, 4, 8, 16)
    assert preset.dilated_attention.segment_lengths[-1] == preset.seq_length


def test_tiny_preset_and_unknown_name():
    tiny = PRESETS["tiny"]
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.seq_length) == (2, 64, 4, 256)
    assert tiny.dilated_attention.patterns == ((64, 1), (128, 2), (256, 4))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_vocab_padding_follows_megatron_convention():
    preset = get_preset("125m")
    assert preset.padded_vocab_size(1) == 100352  # 100277 -> multiple of 128
    assert preset.padded_vocab_size(8) % (128 * 8) == 0
    assert preset.padded_vocab_size(8) >= preset.vocab_size


def tiny_config(**overrides) -> LongNetConfig:
    return make_longnet_config("tiny", **overrides)


def test_config_rejects_attention_dropout():
    with pytest.raises(ValueError, match="attention_dropout"):
        tiny_config(attention_dropout=0.1)


def test_config_rejects_wrong_per_layer_length():
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        tiny_config(dilated_attention_per_layer=[None, None, None])


def test_per_layer_patterns_accept_dicts_and_fall_back_to_default():
    override = DilatedAttentionConfig((32,), (1,))
    config = tiny_config(dilated_attention_per_layer=[None, override.to_dict()])
    assert config.dilated_config_for_layer(1) == PRESETS["tiny"].dilated_attention
    assert config.dilated_config_for_layer(2) == override


def test_config_survives_deepcopy_pickle_megatron_logging_and_json_export():
    config = tiny_config(dilated_attention_per_layer=[DilatedAttentionConfig((32,), (1,)), None])
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.dilated_config_for_layer(1).patterns == ((32, 1),)
        assert clone.dilated_attention == config.dilated_attention
    logged = json.loads(json.dumps(config, cls=JSONEncoderWithMcoreTypes))  # Megatron's config logger
    assert logged["dilated_attention"] == config.dilated_attention.to_dict()
    exported = json.loads(json.dumps(config.dilated_patterns_dict()))
    assert [DilatedAttentionConfig.from_dict(d).patterns for d in exported["per_layer"]] == [
        ((32, 1),),
        ((64, 1), (128, 2), (256, 4)),
    ]


def same_spec(a, b) -> bool:
    """Specs equal field by field; megatron-core 0.19 builds some submodules as functools.partial
    objects, new on every call, which compare by identity: those compare by function and arguments."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (
            a.func == b.func
            and len(a.args) == len(b.args)
            and all(same_spec(x, y) for x, y in zip(a.args, b.args))
            and a.keywords.keys() == b.keywords.keys()
            and all(same_spec(a.keywords[k], b.keywords[k]) for k in a.keywords)
        )
    if dataclasses.is_dataclass(a) and type(a) is type(b) and not isinstance(a, type):
        return all(same_spec(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def test_local_spec_differs_from_megatron_only_in_core_attention():
    ours, megatron = get_longnet_layer_spec(use_te=False), get_gpt_layer_local_spec()
    assert ours.submodules.self_attention.submodules.core_attention.module is DilatedCoreAttention
    for field in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert getattr(ours.submodules.self_attention.submodules, field) == getattr(
            megatron.submodules.self_attention.submodules, field
        )
    assert same_spec(ours.submodules.mlp, megatron.submodules.mlp)
    assert ours.submodules.input_layernorm == megatron.submodules.input_layernorm


def test_te_spec_is_used_exactly_when_te_imports():
    default = get_longnet_layer_spec()
    if transformer_engine_available():
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        assert default.submodules.self_attention.submodules.linear_qkv is TELayerNormColumnParallelLinear
    else:
        assert same_spec(default, get_longnet_layer_spec(use_te=False))
        with pytest.raises(ImportError, match="Transformer Engine"):
            get_longnet_layer_spec(use_te=True)
    assert default.submodules.self_attention.submodules.core_attention.module is DilatedCoreAttention


def test_tensor_parallel_dims_by_layer_kind():
    assert tensor_parallel_dim("decoder.layers.0.self_attention.linear_qkv.weight") == 0
    assert tensor_parallel_dim("decoder.layers.0.mlp.linear_fc1.bias") == 0
    assert tensor_parallel_dim("embedding.word_embeddings.weight") == 0
    assert tensor_parallel_dim("decoder.layers.0.self_attention.linear_proj.weight") == 1
    assert tensor_parallel_dim("decoder.layers.0.self_attention.linear_proj.bias") is None
    assert tensor_parallel_dim("decoder.layers.0.input_layernorm.weight") is None


@pytest.mark.parametrize("gated", [False, True])
def test_shard_then_merge_is_identity(gated):
    full = {
        "decoder.layers.0.mlp.linear_fc1.weight": torch.arange(48.0).reshape(8, 6),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.arange(24.0).reshape(6, 4),
        "decoder.layers.0.pre_mlp_layernorm.weight": torch.ones(6),
        "decoder.layers.0.mlp.linear_fc1._extra_state": torch.zeros(1),
    }
    shards = [shard_for_tensor_parallel(full, r, 2, gated_linear_unit=gated) for r in range(2)]
    merged = merge_tensor_parallel_shards(shards, gated_linear_unit=gated)
    assert sorted(merged) == sorted(k for k in full if not k.endswith("_extra_state"))
    for name, tensor in merged.items():
        assert torch.equal(tensor, full[name]), name
    fc1 = shards[0]["decoder.layers.0.mlp.linear_fc1.weight"]
    # Gated: rank 0 holds the first half of the gate rows and the first half of the up rows.
    expected_rows = [0, 1, 4, 5] if gated else [0, 1, 2, 3]
    assert torch.equal(fc1, full["decoder.layers.0.mlp.linear_fc1.weight"][expected_rows])


def test_rename_local_to_te_moves_norms_into_fused_linears():
    renamed = rename_local_to_te(
        {
            "decoder.layers.3.input_layernorm.weight": torch.ones(1),
            "decoder.layers.3.pre_mlp_layernorm.bias": torch.ones(1),
            "decoder.final_layernorm.weight": torch.ones(1),
        }
    )
    assert sorted(renamed) == [
        "decoder.final_layernorm.weight",
        "decoder.layers.3.mlp.linear_fc1.layer_norm_bias",
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
    ]


def test_contiguous_cp_chunk():
    x = torch.arange(12).reshape(12, 1)
    assert contiguous_cp_chunk(x, 0, 2, 3).flatten().tolist() == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="not divisible"):
        contiguous_cp_chunk(x, 0, 0, 5)
