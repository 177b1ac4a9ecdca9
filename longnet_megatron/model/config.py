"""LongNetConfig: Megatron's TransformerConfig plus the dilated attention patterns.

Megatron hands the layer's TransformerConfig to every submodule it builds, so hanging the dilated
configuration on a TransformerConfig subclass is how the core attention receives it without any change
to Megatron's layer, block or model code. A plain dataclass subclass survives everything Megatron does
to configs (``copy.deepcopy`` in SelfAttention under GQA with tp > num_query_groups, pickling,
``dataclasses.fields``-based logging).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from longnet_megatron.attention import DilatedAttentionConfig

PerLayerPatterns = Sequence[DilatedAttentionConfig | None] | Callable[[int], DilatedAttentionConfig | None]


def _as_dilated(value: DilatedAttentionConfig | dict[str, Any] | None) -> DilatedAttentionConfig | None:
    if value is None or isinstance(value, DilatedAttentionConfig):
        return value
    if isinstance(value, dict):
        return DilatedAttentionConfig.from_dict(value)
    raise TypeError(f"expected a DilatedAttentionConfig or its dict form, got {type(value).__name__}")


@dataclass
class LongNetConfig(TransformerConfig):
    """TransformerConfig for LongNet models.

    dilated_attention:           patterns every layer uses unless overridden.
    dilated_attention_per_layer: per-layer override, indexed by Megatron's global 1-based layer number:
                                 a sequence of length ``num_layers`` (None entries fall back to
                                 ``dilated_attention``) or a callable ``layer_number -> config | None``.
                                 Prefer a sequence when the config must be pickled (lambdas do not).
    attention_backend_name:      dilated attention kernel ("auto", "reference", "te", "sdpa", "triton").
                                 Megatron's own ``attention_backend`` field is unrelated and unused.
    loss_chunk_tokens:           training loss from the output layer in chunks of this many tokens, never
                                 materialising the logits (:class:`LongNetGPTModel`); None or 0: off.
    mlp_chunk_tokens:            run each layer's MLP in chunks of this many tokens, each under an activation
                                 checkpoint (:class:`~longnet_megatron.model.chunked_mlp.ChunkedMLP`: only one
                                 chunk's fc1/GeLU activations alive in backward); None or 0: off.
    """

    dilated_attention: DilatedAttentionConfig | None = None
    dilated_attention_per_layer: PerLayerPatterns | None = None
    attention_backend_name: str = "auto"
    loss_chunk_tokens: int | None = None
    mlp_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dilated_attention = _as_dilated(self.dilated_attention)
        per_layer = self.dilated_attention_per_layer
        if per_layer is not None and not callable(per_layer):
            per_layer = tuple(_as_dilated(c) for c in per_layer)
            if len(per_layer) != self.num_layers:
                raise ValueError(
                    f"dilated_attention_per_layer has {len(per_layer)} entries for {self.num_layers} layers"
                )
            self.dilated_attention_per_layer = per_layer
        if self.dilated_attention is None and per_layer is None:
            raise ValueError("LongNetConfig needs dilated_attention (or dilated_attention_per_layer)")
        for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
            chunk = getattr(self, name)
            if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
                raise ValueError(f"{name}={chunk!r} must be None or an integer >= 0 (0: off)")
        if self.mlp_chunk_tokens and self.fp8:
            raise ValueError(
                f"mlp_chunk_tokens={self.mlp_chunk_tokens} with fp8={self.fp8!r}: the chunks' activation "
                "checkpoints would replay Transformer Engine's FP8 amax updates; use one or the other"
            )
        if self.attention_dropout:
            raise ValueError(
                f"attention_dropout={self.attention_dropout}: dilated attention has no dropout on "
                "attention probabilities; set attention_dropout=0.0"
            )

    def dilated_config_for_layer(self, layer_number: int) -> DilatedAttentionConfig:
        """Patterns of the layer with Megatron's global 1-based ``layer_number``."""
        per_layer = self.dilated_attention_per_layer
        chosen = None
        if callable(per_layer):
            chosen = _as_dilated(per_layer(layer_number))
        elif per_layer is not None:
            if not 1 <= layer_number <= len(per_layer):
                raise ValueError(f"layer_number {layer_number} outside 1..{len(per_layer)}")
            chosen = per_layer[layer_number - 1]
        chosen = chosen or self.dilated_attention
        if chosen is None:
            raise ValueError(f"layer {layer_number} has no dilated attention patterns and no default")
        return chosen

    def dilated_patterns_dict(self) -> dict[str, Any]:
        """Plain-JSON form of every layer's patterns (for checkpoint metadata and export).

        Callables are resolved here, so the result is complete and serialisable either way.
        """
        return {
            "default": self.dilated_attention.to_dict() if self.dilated_attention else None,
            "per_layer": [self.dilated_config_for_layer(n).to_dict() for n in range(1, self.num_layers + 1)],
            "backend": self.attention_backend_name,
        }
