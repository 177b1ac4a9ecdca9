"""The record: what a checkpoint says about its network, so it can be rebuilt in any layout.

A Megatron dist checkpoint stores tensors by layout-independent keys and global shapes, not the
network they belong to. The model record is that description, a plain JSON dict; every checkpoint
this project writes (the trainer's and the converter's) carries it in ``iter_N/longnet.json``::

    {"format": "longnet-megatron/checkpoint", "version": 2, "step": 100, "weights_only": false,
     "megatron_core": "0.16.1",
     "longnet_model": {"format": "longnet-megatron/model", "version": 1,
                       "preset": {...LongNetPreset fields...}, "config": {...TransformerConfig fields
                       that change the math...}, "dilated_attention_per_layer": [...] | None,
                       "attention_backend": "auto", "layout": {"tp": 2, "pp": 1, "cp": 1, "vpp": None},
                       "padded_vocab_size": 256, "tokenizer": {...Tokenizer.describe()...} | None},
     "job": {...the training job's resolved config...}}        (trainer checkpoints only)

:func:`model_record` writes it from the ``(preset, config)`` a model was built from, :func:`rebuild_config`
turns it back into them for the current parallel layout, :func:`read_metadata` reads it (also from
checkpoints written before this format: :func:`_legacy_metadata`). docs/design.md section 6.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.checkpoint.errors import CheckpointError
from longnet_megatron.checkpoint.files import METADATA, write_atomic
from longnet_megatron.checkpoint.verify import read_common, read_json
from longnet_megatron.model import LongNetPreset, get_preset, make_longnet_config

RECORD_KEY = "longnet_model"
RECORD_FORMAT = "longnet-megatron/model"
RECORD_VERSION = 1
METADATA_FORMAT = "longnet-megatron/checkpoint"
METADATA_VERSION = 2

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
# Activations by name (torch.nn.functional); the exported model supports the same three.
ACTIVATIONS = ("gelu", "silu", "relu")
# Settings the exported model does not implement: (field, value Megatron's GPT default has).
_UNSUPPORTED = (
    ("rotary_interleaved", False),
    ("qk_layernorm", False),
    ("layernorm_zero_centered_gamma", False),
    ("apply_residual_connection_post_layernorm", False),
)


def _preset_to_dict(preset: LongNetPreset) -> dict[str, Any]:
    data = dataclasses.asdict(preset)
    data["dilated_attention"] = preset.dilated_attention.to_dict()
    return data


def model_record(
    preset: LongNetPreset, config: Any, tokenizer: dict[str, Any] | None = None
) -> dict[str, Any]:
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
    """``record`` if it is a model record this version reads; else a :class:`CheckpointError`."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise CheckpointError(
            f"{where}: no LongNet model record (expected a dict with format={RECORD_FORMAT!r}); "
            "not written by longnet-megatron",
            "foreign",
        )
    if record.get("version") != RECORD_VERSION:
        raise CheckpointError(
            f"{where}: model record version {record.get('version')!r}; this version reads "
            f"version {RECORD_VERSION}. Upgrade longnet-megatron.",
            "foreign",
        )
    config = record["config"]
    for name, default in _UNSUPPORTED:
        if config.get(name, default) != default:
            raise CheckpointError(
                f"{where}: {name}={config[name]!r} is not supported by the exported model", "mismatched"
            )
    if config.get("activation") not in ACTIVATIONS:
        raise CheckpointError(
            f"{where}: activation {config.get('activation')!r} is not supported (one of {list(ACTIVATIONS)})",
            "mismatched",
        )
    if config.get("add_qkv_bias") and not config.get("add_bias_linear"):
        raise CheckpointError(
            f"{where}: add_qkv_bias without add_bias_linear is not supported by the exported model",
            "mismatched",
        )
    return record


def rebuild_preset(record: dict[str, Any]) -> LongNetPreset:
    """The :class:`~longnet_megatron.model.LongNetPreset` of a record."""
    data = dict(record["preset"])
    data["dilated_attention"] = DilatedAttentionConfig.from_dict(data["dilated_attention"])
    return LongNetPreset(**data)


def rebuild_config(record: dict[str, Any], attention_backend: str | None = None, **overrides: Any):
    """``(preset, LongNetConfig)`` of a record, parallel sizes read from Megatron's parallel_state.

    ``overrides`` set further TransformerConfig fields (e.g. ``bf16=True``).
    """
    import torch.nn.functional as F

    preset = rebuild_preset(record)
    fields = {k: v for k, v in record["config"].items() if k != "activation"}
    fields["activation_func"] = getattr(F, record["config"]["activation"])
    config = make_longnet_config(
        preset,
        dilated_attention_per_layer=record.get("dilated_attention_per_layer"),
        attention_backend_name=attention_backend or record.get("attention_backend", "auto"),
        **{**fields, **overrides},
    )
    return preset, config


def checkpoint_metadata(
    step: int, record: dict[str, Any], *, weights_only: bool, job: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``longnet.json`` of a checkpoint at ``step`` holding ``record``."""
    import megatron.core

    meta = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "step": step,
        "weights_only": weights_only,
        "megatron_core": megatron.core.__version__,
        RECORD_KEY: record,
    }
    if job is not None:
        meta["job"] = job
    return meta


def write_metadata(ckpt: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` as ``ckpt/longnet.json`` (atomically)."""
    import json

    write_atomic(Path(ckpt) / METADATA, json.dumps(meta, indent=2) + "\n")


def read_metadata(ckpt: str | Path) -> dict[str, Any]:
    """``ckpt/longnet.json`` in the current format (older formats converted), record checked.

    A checkpoint without ``longnet.json`` is read from the record in its common state (converter
    checkpoints of the first format); one with neither is a ``foreign`` :class:`CheckpointError`.
    """
    ckpt = Path(ckpt)
    path = ckpt / METADATA
    if not path.is_file():
        common = read_common(ckpt)
        record = common.get(RECORD_KEY)
        if record is None:
            raise CheckpointError(
                f"{ckpt}: a Megatron dist checkpoint without {METADATA} or a LongNet model record: "
                "not saved by longnet-megatron (foreign checkpoint)",
                "foreign",
            )
        step = int(common.get("iteration", common.get("train_state", {}).get("step", 0)))
        return checkpoint_metadata(step, check_record(record, str(ckpt)), weights_only=True)
    meta = read_json(path, "checkpoint")
    if meta.get("format") != METADATA_FORMAT:
        meta = _legacy_metadata(meta, str(path))
    elif meta.get("version") != METADATA_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint metadata version {meta.get('version')!r}; this version reads "
            f"{METADATA_VERSION}. Upgrade longnet-megatron.",
            "foreign",
        )
    check_record(meta.get(RECORD_KEY), str(path))
    return meta


def read_record(ckpt: str | Path) -> dict[str, Any]:
    """The model record of a checkpoint (see :func:`read_metadata`)."""
    return read_metadata(ckpt)[RECORD_KEY]


def _legacy_metadata(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """``longnet.json`` of the first format, as the current one.

    The converter wrote ``{"format": "megatron.core.dist_checkpointing", "weights_only": true,
    "longnet_model": record}``; the trainer wrote the preset name, the architecture overrides and
    every layer's patterns under ``"model"`` (the remaining TransformerConfig fields are
    ``make_longnet_config``'s defaults, which that trainer never overrode for anything that changes
    the network's arithmetic) plus ``"config"`` (the job) and ``"parallel"``.
    """
    step = int(meta.get("step", 0))
    if RECORD_KEY in meta:
        record = check_record(meta[RECORD_KEY], where)
        return checkpoint_metadata(step, record, weights_only=bool(meta.get("weights_only", True)))
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
        raise CheckpointError(
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
    return checkpoint_metadata(step, record, weights_only=False, job=meta.get("config"))
