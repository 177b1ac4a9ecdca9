"""LongNet on Megatron-Core: config, core attention, layer specs, presets and the GPTModel builder."""

from longnet_megatron.model.builder import build_longnet_gpt, make_longnet_config
from longnet_megatron.model.config import LongNetConfig
from longnet_megatron.model.core_attention import DilatedCoreAttention
from longnet_megatron.model.presets import PRESETS, LongNetPreset, get_preset
from longnet_megatron.model.rope import ContiguousCPRotaryEmbedding, contiguous_cp_chunk
from longnet_megatron.model.specs import get_longnet_layer_spec

__all__ = [
    "PRESETS",
    "ContiguousCPRotaryEmbedding",
    "DilatedCoreAttention",
    "LongNetConfig",
    "LongNetPreset",
    "build_longnet_gpt",
    "contiguous_cp_chunk",
    "get_longnet_layer_spec",
    "get_preset",
    "make_longnet_config",
]
