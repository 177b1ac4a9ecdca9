"""Megatron dist checkpoint (any layout) -> Hugging Face-style folder.

    folder/config.json                 LongNetArgs + model_type "longnet" + auto_map + the model record
    folder/generation_config.json
    folder/model.safetensors           (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    folder/tokenizer_config.json       (+ tokenizer.tiktoken for a custom rank file)
    folder/configuration_longnet.py, modeling_longnet.py   for transformers' trust_remote_code

The checkpoint is loaded into a TP=PP=1 model in this process (dist checkpoints are layout-
independent), renamed with :mod:`~longnet_megatron.export.mapping`, and written. The folder loads
with :meth:`LongNetForCausalLM.from_pretrained` (no Megatron, no transformers) and with
``transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from longnet_megatron.checkpoint import CheckpointError, find_checkpoint
from longnet_megatron.checkpoint.weights import load_full_model
from longnet_megatron.export.architecture import export_args
from longnet_megatron.export.mapping import megatron_to_hf_state
from longnet_megatron.export.plain import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, LongNetArgs
from longnet_megatron.export.tokenizer_files import write_tokenizer
from longnet_megatron.model.state_dict import tensors_only

HF_MODEL_DIR = Path(__file__).parent / "hf_model"
MODEL_CODE = ("configuration_longnet.py", "modeling_longnet.py")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # transformers' default is 5 GB; 2 GiB keeps uploads resumable
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(args: LongNetArgs, record: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json``: the model's keys plus what transformers needs to find the remote code."""
    return {
        "model_type": "longnet",
        "architectures": ["LongNetHFForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_longnet.LongNetHFConfig",
            "AutoModelForCausalLM": "modeling_longnet.LongNetHFForCausalLM",
        },
        **args.to_dict(),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "megatron_record": record,
    }


def _shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """One ``model.safetensors``, or shards of at most ``max_shard_bytes`` (one tensor may exceed it)
    with transformers' index file. Returns the files written."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, folder / WEIGHTS_FILE, metadata=metadata)
        return [WEIGHTS_FILE]
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    names = _shard_names(len(groups))
    weight_map = {}
    for name, group in zip(names, groups):
        save_file(group, folder / name, metadata=metadata)
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, WEIGHTS_INDEX_FILE]


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing export unless ``overwrite``, and anything but an earlier LongNet export even
    then; refuse an output whose parent cannot be written. Runs before any work."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a folder", "mismatched")
        if any(out_dir.iterdir()):
            config = out_dir / CONFIG_FILE
            try:
                is_export = json.loads(config.read_text()).get("model_type") == "longnet"
            except (OSError, ValueError):
                is_export = False
            if not is_export:
                raise CheckpointError(
                    f"{out_dir} is not empty and is not a LongNet export: refusing to overwrite it",
                    "mismatched",
                )
            if not overwrite:
                raise CheckpointError(
                    f"{out_dir} already holds an export: pass --overwrite to replace it", "mismatched"
                )
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{parent} is not writable: cannot create {out_dir}", "unwritable")


def write_hf_folder(
    out_dir: str | os.PathLike,
    args: LongNetArgs,
    state: dict[str, torch.Tensor],
    record: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a complete export folder (atomically: built beside ``out_dir``, then moved in place).

    A failed write (disk full, permissions) leaves ``out_dir`` as it was and raises an
    ``unwritable`` :class:`CheckpointError` naming the folder.
    """
    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise CheckpointError(f"cannot create {out_dir}: {e.strerror or e}", "unwritable") from e
    try:
        staging.chmod(0o755)
        if record.get("tokenizer") is not None:
            tokenizer = write_tokenizer(staging, record["tokenizer"], args.max_position_embeddings)
            args.eos_token_id = tokenizer.eod_id
            if tokenizer.vocab_size > args.vocab_size:
                raise CheckpointError(
                    f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model's embedding "
                    f"{args.vocab_size} rows",
                    "mismatched",
                )
            args.tokenizer_vocab_size = tokenizer.vocab_size
        state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        write_safetensors(staging, state, max_shard_bytes)
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config(args, record, dtype), indent=2) + "\n")
        generation = {"eos_token_id": args.eos_token_id, "do_sample": False, "use_cache": True}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in MODEL_CODE:
            shutil.copyfile(HF_MODEL_DIR / name, staging / name)
        for file in staging.iterdir():
            file.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except OSError as e:
        raise CheckpointError(
            f"writing {out_dir} failed: {e.strerror or e}; nothing was replaced", "unwritable"
        ) from e
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def export_to_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a LongNet Megatron checkpoint (or the latest of a run directory) to ``out_dir``.

    Runs Megatron in this process (one gloo rank, CPU unless CUDA is present). ``tokenizer``
    replaces the description saved with the checkpoint (e.g. when the checkpoint has none).
    """
    model, record = load_full_model(find_checkpoint(checkpoint))
    if tokenizer is not None:
        record = {**record, "tokenizer": tokenizer}
    padded = model.embedding.word_embeddings.weight.shape[0]
    args = export_args(record, padded)
    state = megatron_to_hf_state(tensors_only(model.state_dict()), args)
    return write_hf_folder(
        out_dir,
        args,
        state,
        record,
        dtype=DTYPES[dtype],
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
