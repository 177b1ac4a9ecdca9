"""The model record: what a checkpoint must say about its network so it can be rebuilt anywhere.

A Megatron dist checkpoint stores tensors by layout-independent keys and global shapes, but not the
network they belong to. The record is that description, a plain JSON-able dict saved in the
checkpoint's common state (key :data:`RECORD_KEY`) and copied into an exported ``config.json``::

    {"format": "longnet-megatron/model", "version": 1,
     "preset": {...LongNetPreset fields, patterns as dicts...},
     "config": {...TransformerConfig fields that change the math...},
     "dilated_attention_per_layer": [...] | None, "attention_backend": "auto",
     "layout": {"tp": 2, "pp": 1, "cp": 1, "vpp": None}, "padded_vocab_size": 256,
     "tokenizer": {...Tokenizer.describe()...} | None}

:func:`model_record` writes it from the ``(preset, config)`` a model was built from;
:func:`rebuild_config` turns it back into them for any parallel layout; :func:`export_args` gives the
exported model's :class:`~longnet_megatron.export.plain.LongNetArgs`. Nothing here imports Megatron
until a config is rebuilt.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn.functional as F

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.export.errors import ConversionError
from longnet_megatron.export.plain import LongNetArgs

RECORD_KEY = "longnet_model"
RECORD_FORMAT = "longnet-megatron/model"
RECORD_VERSION = 1

# TransformerConfig fields that change the network's arithmetic (everything else is parallelism,
# precision or performance). Values must be JSON-able.
_CONFIG_FIELDS = (
    "num_query_groups",
    "ffn_hidden_size",
    "kv_channels",
    "normalization",
    "layernorm_epsilon",
    "add_bias_linear",
    "add_qkv_bias",
    "gated_linear_unit",
    "softmax_scale",
    "rotary_interleaved",
    "qk_layernorm",
    "layernorm_zero_centered_gamma",
    "apply_residual_connection_post_layernorm",
)
_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
# Settings the exported model does not implement: (field, value Megatron's GPT default has).
_UNSUPPORTED = (
    ("rotary_interleaved", False),
    ("qk_layernorm", False),
    ("layernorm_zero_centered_gamma", False),
    ("apply_residual_connection_post_layernorm", False),
)


def _preset_to_dict(preset) -> dict[str, Any]:
    data = dataclasses.asdict(preset)
    data["dilated_attention"] = preset.dilated_attention.to_dict()
    return data


def model_record(preset, config, tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a model built by ``build_longnet_gpt(preset, config=config)``.

    The layout is the config's (tp, pp, cp, vpp): informative only, since dist checkpoints load into
    any layout. ``tokenizer`` is the data's ``Tokenizer.describe()``.
    """
    activation = getattr(config.activation_func, "__name__", repr(config.activation_func))
    per_layer = None
    if config.dilated_attention_per_layer is not None:
        per_layer = config.dilated_patterns_dict()["per_layer"]
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "preset": _preset_to_dict(preset),
        "config": {**{name: getattr(config, name) for name in _CONFIG_FIELDS}, "activation": activation},
        "dilated_attention_per_layer": per_layer,
        "attention_backend": config.attention_backend_name,
        "layout": {
            "tp": config.tensor_model_parallel_size,
            "pp": config.pipeline_model_parallel_size,
            "cp": config.context_parallel_size,
            "vpp": config.virtual_pipeline_model_parallel_size,
        },
        "padded_vocab_size": preset.padded_vocab_size(config.tensor_model_parallel_size),
        "tokenizer": tokenizer,
    }


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a model record this version reads; else a :class:`ConversionError`."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ConversionError(
            f"{where}: no LongNet model record (expected a dict with format={RECORD_FORMAT!r}); "
            "not written by longnet-megatron",
            "foreign",
        )
    if record.get("version") != RECORD_VERSION:
        raise ConversionError(
            f"{where}: model record version {record.get('version')!r}; this converter reads "
            f"version {RECORD_VERSION}. Upgrade longnet-megatron."
        )
    config = record["config"]
    for name, default in _UNSUPPORTED:
        if config.get(name, default) != default:
            raise ConversionError(
                f"{where}: {name}={config[name]!r} is not supported by the exported model", "mismatched"
            )
    if config.get("activation") not in _ACTIVATIONS:
        raise ConversionError(
            f"{where}: activation {config.get('activation')!r} is not supported by the exported model "
            f"(one of {sorted(_ACTIVATIONS)})"
        )
    if config.get("add_qkv_bias") and not config.get("add_bias_linear"):
        raise ConversionError(
            f"{where}: add_qkv_bias without add_bias_linear is not supported by the exported model",
            "mismatched",
        )
    return record


def rebuild_preset(record: dict[str, Any]):
    """The :class:`~longnet_megatron.model.LongNetPreset` of a record."""
    from longnet_megatron.model.presets import LongNetPreset

    data = dict(record["preset"])
    data["dilated_attention"] = DilatedAttentionConfig.from_dict(data["dilated_attention"])
    return LongNetPreset(**data)


def rebuild_config(record: dict[str, Any], attention_backend: str | None = None, **overrides: Any):
    """``(preset, LongNetConfig)`` of a record, parallel sizes read from Megatron's parallel_state.

    ``overrides`` set further TransformerConfig fields (e.g. ``bf16=True``).
    """
    from longnet_megatron.model import make_longnet_config

    preset = rebuild_preset(record)
    fields = {k: v for k, v in record["config"].items() if k != "activation"}
    fields["activation_func"] = _ACTIVATIONS[record["config"]["activation"]]
    per_layer = record.get("dilated_attention_per_layer")
    config = make_longnet_config(
        preset,
        dilated_attention_per_layer=per_layer,
        attention_backend_name=attention_backend or record.get("attention_backend", "auto"),
        **{**fields, **overrides},
    )
    return preset, config


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


def record_from_training_metadata(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """The record of a checkpoint written by ``longnet_megatron.train`` (its ``longnet.json``).

    The trainer saves the preset name, the architecture overrides and every layer's patterns; the
    remaining TransformerConfig fields are ``make_longnet_config``'s defaults, which the trainer
    does not override for anything that changes the network's arithmetic.
    """
    if RECORD_KEY in meta:
        return check_record(meta[RECORD_KEY], where)
    from longnet_megatron.model import get_preset, make_longnet_config

    try:
        m = meta["model"]
        patterns = m.get("dilated_attention") or {}
        default = patterns.get("default") or {
            "segment_lengths": m["segment_lengths"],
            "dilation_rates": m["dilation_rates"],
        }
        preset = get_preset(m["preset"]).replace(
            num_layers=m["num_layers"],
            hidden_size=m["hidden_size"],
            num_attention_heads=m["num_attention_heads"],
            num_query_groups=m.get("num_query_groups"),
            ffn_hidden_size=m.get("ffn_hidden_size"),
            seq_length=m["seq_length"],
            vocab_size=m["vocab_size"],
            tie_embeddings=m.get("tie_embeddings", True),
            rotary_base=m.get("rotary_base", 10000),
            dilated_attention=DilatedAttentionConfig.from_dict(default),
        )
        per_layer = patterns.get("per_layer")
        if per_layer and all(p == default for p in per_layer):
            per_layer = None
        config = make_longnet_config(
            preset,
            dilated_attention_per_layer=per_layer,
            attention_backend_name=patterns.get("backend", "auto"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(
            f"{where}: model description unreadable ({type(e).__name__}: {e})", "foreign"
        ) from e
    record = model_record(preset, config, meta.get("tokenizer"))
    parallel = meta.get("parallel", {})
    record["layout"] = {
        "tp": parallel.get("tensor", 1),
        "pp": parallel.get("pipeline", 1),
        "cp": parallel.get("context", 1),
        "vpp": parallel.get("virtual_pipeline"),
    }
    record["padded_vocab_size"] = m.get("padded_vocab_size", record["padded_vocab_size"])
    return record
