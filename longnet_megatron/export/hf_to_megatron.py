"""Hugging Face-style export folder -> Megatron dist checkpoint (the round trip back to training).

The folder's ``config.json`` carries the model record of the checkpoint it came from, so the Megatron
model is rebuilt exactly (patterns, GQA, padding); the safetensors are renamed back
(:func:`~longnet_megatron.export.mapping.hf_to_megatron_state`) into a TP=PP=1 model in this process
and saved with dist_checkpointing, which any layout then loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.checkpoint.record import check_record
from longnet_megatron.checkpoint.weights import build_models, save_weights
from longnet_megatron.export.mapping import hf_to_megatron_state
from longnet_megatron.export.plain import CONFIG_FILE, LongNetArgs, load_safetensors_folder
from longnet_megatron.parallel.layout import init_single_process


def import_from_hf(folder: str | os.PathLike, run_dir: str | os.PathLike, *, iteration: int = 0) -> Path:
    """Write ``run_dir/iter_{iteration}`` (and ``run_dir/latest``) from an export folder."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: not an exported LongNet folder", "foreign")
    try:
        config = json.loads(config_path.read_text())
        args = LongNetArgs.from_dict(config)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}", "foreign") from e
    if config.get("model_type") != "longnet":
        raise CheckpointError(
            f"{config_path}: model_type={config.get('model_type')!r}, not 'longnet'", "foreign"
        )
    record = check_record(config.get("megatron_record"), str(config_path))
    try:
        hf_state = load_safetensors_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e), "truncated") from e
    try:
        full = hf_to_megatron_state(hf_state, args)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder}: weights do not match config.json ({e})", "mismatched") from e

    init_single_process()
    (model,) = build_models(record, args.vocab_size)
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    problems = sorted(set(expected) ^ set(full))
    problems += [k for k in full if k in expected and full[k].shape != expected[k].shape]
    if problems:
        raise CheckpointError(
            f"{folder}: weights do not fit the model of its record: {problems[:6]}", "mismatched"
        )
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in full:
                tensor.copy_(full[name])
    return save_weights([model], run_dir, record, iteration)
