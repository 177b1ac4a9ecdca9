"""Exact LongNet dilated attention (docs/design.md sections 1-3).

from longnet_megatron.attention import DilatedAttentionConfig, GraphedDilatedAttention, dilated_attention
cfg = DilatedAttentionConfig(segment_lengths=(2048, 4096), dilation_rates=(1, 2))
out = dilated_attention(q, k, v, cfg)     # q [B, N, Hq, D], k/v [B, N, Hkv, D]
attn = GraphedDilatedAttention(cfg)       # the same, replayed from CUDA graphs (short N: no host wait)
"""

from .api import DilatedAttention, dilated_attention
from .backends import (
    AttentionBackend,
    UnsupportedInputError,
    available_backends,
    get_backend,
    register_backend,
)
from .config import DilatedAttentionConfig
from .graphs import GraphedDilatedAttention

__all__ = [
    "AttentionBackend",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "GraphedDilatedAttention",
    "UnsupportedInputError",
    "available_backends",
    "dilated_attention",
    "get_backend",
    "register_backend",
]
