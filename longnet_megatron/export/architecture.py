"""The exported model's architecture from a checkpoint's model record (:mod:`longnet_megatron.checkpoint.record`).

:func:`export_args` gives the :class:`~longnet_megatron.export.plain.LongNetArgs` of an export's
``config.json`` from the record a Megatron checkpoint carries; :func:`layer_patterns` each layer's
dilated attention as the exported model runs it.
"""

from __future__ import annotations

from typing import Any

from longnet_megatron.export.plain import LongNetArgs


def layer_patterns(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each layer's dilated attention dict as the core attention uses it (causal, Megatron's scale)."""
    preset = record["preset"]
    per_layer = (
        record.get("dilated_attention_per_layer") or [preset["dilated_attention"]] * preset["num_layers"]
    )
    scale = record["config"].get("softmax_scale")
    return [{**p, "causal": True, "softmax_scale": scale} for p in per_layer]


def export_args(
    record: dict[str, Any], padded_vocab_size: int, eos_token_id: int | None = None
) -> LongNetArgs:
    """The exported model's architecture for a record (``padded_vocab_size``: the checkpoint's)."""
    preset, config = record["preset"], record["config"]
    heads = preset["num_attention_heads"]
    head_dim = config.get("kv_channels") or preset["hidden_size"] // heads
    return LongNetArgs(
        vocab_size=padded_vocab_size,
        tokenizer_vocab_size=preset["vocab_size"],
        hidden_size=preset["hidden_size"],
        intermediate_size=config.get("ffn_hidden_size") or 4 * preset["hidden_size"],
        num_hidden_layers=preset["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_query_groups") or heads,
        head_dim=head_dim,
        dilated_attention=layer_patterns(record),
        max_position_embeddings=preset["seq_length"],
        rope_theta=float(preset["rotary_base"]),
        normalization=config["normalization"],
        layer_norm_eps=config["layernorm_epsilon"],
        hidden_act=config["activation"],
        gated_mlp=bool(config["gated_linear_unit"]),
        bias=bool(config["add_bias_linear"]),
        tie_word_embeddings=bool(preset["tie_embeddings"]),
        attention_backend=record.get("attention_backend", "auto"),
        eos_token_id=eos_token_id,
    )
