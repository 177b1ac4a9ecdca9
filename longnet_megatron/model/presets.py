"""Named model sizes: GPT-3 shapes with LongNet's dilated attention patterns.

Sizes follow the GPT-3 paper (Brown et al. 2020, table 2.1); the 1.3B row there lists 24 heads of 128,
which does not multiply to d_model = 2048, so it uses 16 heads of 128 as every reimplementation does.
The default patterns are LongNet's geometric sequence w_k = 2048 * 2^k, r_k = 2^k up to the preset's
sequence length (32768: five patterns). The paper's own language-model rates (1, 2, 4, 6, 12) are
``DilatedAttentionConfig.paper()``; pass it (or anything else) through ``LongNetPreset.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from longnet_megatron.attention import DilatedAttentionConfig

CL100K_BASE_VOCAB_SIZE = (
    100277  # the project's default tokenizer (docs/design.md section 5), special tokens included
)


@dataclass(frozen=True)
class LongNetPreset:
    """Architecture of a LongNet GPT: what a model size means, independent of how it is parallelised.

    num_query_groups: None for multi-head attention, else the number of kv heads (GQA).
    ffn_hidden_size: None for 4 * hidden_size.
    make_vocab_size_divisible_by: the vocabulary is padded to a multiple of this times the tensor-
        parallel size (Megatron-LM's convention), so the embedding shards evenly.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    dilated_attention: DilatedAttentionConfig
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = CL100K_BASE_VOCAB_SIZE
    make_vocab_size_divisible_by: int = 128
    tie_embeddings: bool = True
    rotary_base: int = 10000
    init_method_std: float = 0.02

    def replace(self, **changes: Any) -> LongNetPreset:
        """A copy with some fields changed (e.g. ``num_layers=4`` or another ``dilated_attention``)."""
        return dataclasses.replace(self, **changes)

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary size rounded up so the embedding splits evenly over the tensor-parallel ranks."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple


def _gpt3(name: str, layers: int, hidden: int, heads: int, seq_length: int = 32768) -> LongNetPreset:
    return LongNetPreset(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=seq_length,
        dilated_attention=DilatedAttentionConfig.geometric(2048, num_patterns=5, max_segment=seq_length),
    )


PRESETS: dict[str, LongNetPreset] = {
    "tiny": LongNetPreset(
        name="tiny",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=256,
        dilated_attention=DilatedAttentionConfig((64, 128, 256), (1, 2, 4)),
        vocab_size=256,
        make_vocab_size_divisible_by=64,
    ),
    "125m": _gpt3("125m", 12, 768, 12),
    "350m": _gpt3("350m", 24, 1024, 16),
    "760m": _gpt3("760m", 24, 1536, 16),
    "1.3b": _gpt3("1.3b", 24, 2048, 16),
    "2.7b": _gpt3("2.7b", 32, 2560, 32),
}


def get_preset(name_or_preset: str | LongNetPreset) -> LongNetPreset:
    """Look a preset up by name (or pass one through)."""
    if isinstance(name_or_preset, LongNetPreset):
        return name_or_preset
    try:
        return PRESETS[name_or_preset]
    except KeyError:
        raise ValueError(f"unknown preset {name_or_preset!r}; choose one of {sorted(PRESETS)}") from None
