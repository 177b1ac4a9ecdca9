"""LongNet on Megatron-Core: config, core attention, layer specs, presets, the GPTModel and its builder."""

from longnet_megatron.model.builder import build_longnet_gpt, make_longnet_config
from longnet_megatron.model.chunked_loss import chunked_linear_cross_entropy
from longnet_megatron.model.config import LongNetConfig
from longnet_megatron.model.core_attention import DilatedCoreAttention
from longnet_megatron.model.gpt_model import LongNetGPTModel
from longnet_megatron.model.presets import PRESETS, LongNetPreset, get_preset
from longnet_megatron.model.rope import ContiguousCPRotaryEmbedding
from longnet_megatron.model.specs import get_longnet_layer_spec

__all__ = [
    "PRESETS",
    "ContiguousCPRotaryEmbedding",
    "DilatedCoreAttention",
    "LongNetConfig",
    "LongNetGPTModel",
    "LongNetPreset",
    "build_longnet_gpt",
    "chunked_linear_cross_entropy",
    "get_longnet_layer_spec",
    "get_preset",
    "make_longnet_config",
]
