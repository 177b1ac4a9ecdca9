"""Megatron dist checkpoints of LongNet models: find, verify, read the record, load into any layout, save.

A checkpoint directory holds one checkpoint per saved iteration and a ``latest`` marker, as the
trainer writes them (``longnet_megatron.train.checkpoint``)::

    run_dir/checkpoints/latest                 "iter_0000100" (Megatron-LM's
    run_dir/checkpoints/iter_0000100/          latest_checkpointed_iteration.txt is read too)
        metadata.json  common.pt  .metadata  __0_0.distcp ...   (megatron.core.dist_checkpointing)
        longnet.json                           step, config, model description, tokenizer

Any of ``run_dir``, ``run_dir/checkpoints`` or ``run_dir/checkpoints/iter_0000100`` can be given.

Tensors are stored under layout-independent keys with their global shapes, so a checkpoint saved
with any TP / PP / CP / DP layout loads into a model built with any other: this module builds the
model for whatever Megatron parallel state is current (one process, TP=PP=1, for export) and asks
dist_checkpointing for that model's ``sharded_state_dict``. The network comes from the model record
(:mod:`~longnet_megatron.export.architecture`) in the checkpoint's common state.

Before any tensor is read, :func:`verify_checkpoint` and :func:`check_tensors` turn the three usual
failures into a :class:`ConversionError` naming the path: truncated (missing or short files),
mismatched (keys or shapes unlike the architecture), foreign (not a dist checkpoint, not LongNet).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from longnet_megatron.export.architecture import (
    RECORD_KEY,
    check_record,
    rebuild_config,
    record_from_training_metadata,
)
from longnet_megatron.export.errors import ConversionError
from longnet_megatron.train.checkpoint import LATEST, METADATA, checkpoint_name, write_atomic

# The trainer's marker first; Megatron-LM's is read too.
LATEST_MARKERS = (LATEST, "latest_checkpointed_iteration.txt")
CHECKPOINTS_SUBDIR = "checkpoints"  # the trainer's default checkpoint.dir inside a run directory
# Top-level names of model tensors in a GPTModel's sharded state dict (optimizer keys differ).
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory of ``path``: itself, or the one a run directory's marker names."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist", "missing")
    if not path.is_dir():
        raise ConversionError(f"{path} is a file, not a Megatron dist checkpoint directory", "foreign")
    if (path / "metadata.json").exists():
        return path
    if not any((path / m).is_file() for m in LATEST_MARKERS) and (path / CHECKPOINTS_SUBDIR).is_dir():
        path = path / CHECKPOINTS_SUBDIR
    for marker in LATEST_MARKERS:
        marker_path = path / marker
        if marker_path.is_file():
            text = marker_path.read_text().strip()
            ckpt = path / (checkpoint_name(int(text)) if text.isdigit() else text)
            if not ckpt.is_dir():
                raise ConversionError(
                    f"{marker_path} names {ckpt.name}, which does not exist in {path} (truncated copy?)",
                    "truncated",
                )
            return ckpt
    raise ConversionError(
        f"{path} is not a Megatron dist checkpoint (no metadata.json) nor a run directory with a "
        f"{' or '.join(LATEST_MARKERS)} marker",
        "foreign",
    )


def verify_checkpoint(ckpt: Path) -> None:
    """Raise if ``ckpt`` is not a complete torch_dist checkpoint (files listed in its metadata exist
    and are long enough); nothing is loaded."""
    meta_path = ckpt / "metadata.json"
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path} is missing: truncated checkpoint", "truncated")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{meta_path} is unreadable ({e}): truncated checkpoint?", "truncated") from e
    backend = meta.get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(
            f"{ckpt}: sharded backend {backend!r}; only torch_dist checkpoints (Megatron's default) are "
            "supported",
            "foreign",
        )
    if not (ckpt / "common.pt").is_file():
        raise ConversionError(f"{ckpt / 'common.pt'} is missing: truncated checkpoint", "truncated")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - any failure to parse means the same thing here
        raise ConversionError(
            f"{ckpt / '.metadata'} is missing or unreadable ({type(e).__name__}): truncated checkpoint",
            "truncated",
        ) from e
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = ckpt / name
        if not file.is_file():
            raise ConversionError(f"{file} is missing: truncated checkpoint", "truncated")
        if file.stat().st_size < size:
            raise ConversionError(
                f"{file} has {file.stat().st_size} bytes, its metadata needs {size}: truncated checkpoint",
                "truncated",
            )


def read_common(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's common (non-sharded) state."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(
            f"{ckpt}: cannot read common state ({type(e).__name__}: {e})", "truncated"
        ) from e


def read_record(ckpt: Path) -> dict[str, Any]:
    """The model record of a checkpoint: from its ``longnet.json`` (the trainer's description, or the
    record this package writes there), else from its common state."""
    meta_path = ckpt / METADATA
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ConversionError(f"{meta_path} is not valid JSON ({e}): truncated?", "truncated") from e
        return record_from_training_metadata(meta, str(meta_path))
    record = read_common(ckpt).get(RECORD_KEY)
    if record is None:
        raise ConversionError(
            f"{ckpt}: a Megatron dist checkpoint without {METADATA} or a LongNet model record: "
            "not saved by longnet-megatron (foreign checkpoint)",
            "foreign",
        )
    return check_record(record, str(ckpt))


def open_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint dir, record)`` of a checkpoint or run directory, after the integrity checks."""
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    return ckpt, read_record(ckpt)


def tensors_metadata(ckpt: Path) -> dict[str, Any]:
    """Checkpoint key -> ShardedTensor without data (global shape, dtype)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(str(ckpt))


def padded_vocab_size(ckpt: Path) -> int:
    """Rows of the stored word embedding (the vocabulary padded for the saving layout)."""
    meta = tensors_metadata(ckpt)
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        raise ConversionError(f"{ckpt}: no {key} tensor: not a GPT checkpoint", "foreign")
    return int(meta[key].global_shape[0])


# ----------------------------------------------------------------------------- Megatron processes


def init_single_process() -> None:
    """torch.distributed (gloo, one rank) and Megatron's parallel state for TP=PP=CP=1 in this process.

    On a machine without CUDA, Megatron's CUDA-only calls are redirected to the CPU first. Does
    nothing to an already initialised process group or parallel state.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longnet_megatron.compat import enable_cpu_megatron
    from longnet_megatron.parallel.layout import ParallelLayout, free_port, initialize_megatron_parallel

    enable_cpu_megatron()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        initialize_megatron_parallel(ParallelLayout())


def build_models(
    record: dict[str, Any], padded_vocab: int, attention_backend: str | None = None
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for the current parallel state.

    Local (non-TE) layers: their dist-checkpoint keys equal TE's, and they run everywhere. The
    vocabulary is padded exactly as the checkpoint's (``padded_vocab``) whatever the TP size.
    """
    from megatron.core import parallel_state

    from longnet_megatron.model import build_longnet_gpt

    preset, config = rebuild_config(record, attention_backend)
    tp = config.tensor_model_parallel_size
    if padded_vocab % tp:
        raise ConversionError(
            f"the stored vocabulary of {padded_vocab} rows does not split over tensor-parallel size {tp}",
            "mismatched",
        )
    # make_vocab_size_divisible_by=1: padded_vocab_size(tp) is then padded_vocab itself.
    preset = preset.replace(vocab_size=padded_vocab, make_vocab_size_divisible_by=1)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        chunks.append(
            build_longnet_gpt(
                preset,
                config=config,
                use_te=False,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage if vpp > 1 else None,
            )
        )
    return chunks


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _weights_only(sharded: dict[str, Any]) -> dict[str, Any]:
    # _extra_state holds TE/FP8 bookkeeping, not weights; TE and local layers disagree on it.
    return {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}


def _sharded_model_state(models: list[torch.nn.Module]) -> dict[str, Any]:
    return {_chunk_key(i, len(models)): _weights_only(m.sharded_state_dict()) for i, m in enumerate(models)}


def check_tensors(ckpt: Path, sharded: dict[str, Any], whole_model: bool = True) -> None:
    """Every model tensor ``sharded`` needs is in the checkpoint with its global shape, and (when
    ``sharded`` is the whole model, not one pipeline stage) the checkpoint has no model tensor the
    architecture lacks."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = tensors_metadata(ckpt)
    wanted = {t.key: tuple(t.global_shape) for t in nested_values(sharded) if isinstance(t, ShardedTensor)}
    problems = []
    for key, shape in sorted(wanted.items()):
        if key not in stored:
            problems.append(f"missing tensor {key}")
        elif tuple(stored[key].global_shape) != shape:
            problems.append(f"{key}: stored {tuple(stored[key].global_shape)}, architecture needs {shape}")
    if whole_model:
        extra = sorted(k for k in stored if k.startswith(_MODEL_PREFIXES) and k not in wanted)
        problems += [f"unexpected tensor {k}" for k in extra]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ConversionError(
            f"{ckpt} does not match the architecture in its model record: {shown}", "mismatched"
        )


def load_weights(models: list[torch.nn.Module], ckpt: Path) -> None:
    """Load the checkpoint's weights into this rank's model chunks (any saving layout)."""
    from megatron.core import dist_checkpointing, parallel_state

    sharded = _sharded_model_state(models)
    check_tensors(ckpt, sharded, whole_model=parallel_state.get_pipeline_model_parallel_world_size() == 1)
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    for i, model in enumerate(models):
        result = model.load_state_dict(loaded[_chunk_key(i, len(models))], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConversionError(
                f"{ckpt}: loaded state does not fit the model (missing {missing[:4]}, "
                f"unexpected {result.unexpected_keys[:4]})",
                "mismatched",
            )


def save_checkpoint(
    models: list[torch.nn.Module], run_dir: str | os.PathLike, record: dict[str, Any], iteration: int = 0
) -> Path:
    """Save this rank's model chunks as ``run_dir/iter_N`` (collective) and point ``latest`` at it.

    ``run_dir`` plays the trainer's ``checkpoint.dir``. The record is rewritten with the current layout
    and also written to ``iter_N/longnet.json``. Weights only: no optimizer, scheduler or RNG state,
    so training started from it starts a fresh optimizer.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    run_dir = Path(run_dir)
    ckpt = run_dir / checkpoint_name(iteration)
    tmp = run_dir / (ckpt.name + ".tmp")  # renamed to ckpt only once complete, as the trainer does
    rank = dist.get_rank()
    if rank == 0:
        if ckpt.exists() and any(ckpt.iterdir()):
            raise ConversionError(f"{ckpt} already exists and is not empty", "mismatched")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    record = dict(record)
    record["layout"] = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }
    state = {**_sharded_model_state(models), RECORD_KEY: record, "iteration": iteration}
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        description = {
            "step": iteration,
            "format": "megatron.core.dist_checkpointing",
            "weights_only": True,
            "tokenizer": record.get("tokenizer"),
            RECORD_KEY: record,
        }
        (tmp / METADATA).write_text(json.dumps(description, indent=2) + "\n")
        if ckpt.exists():  # an empty directory left by hand
            ckpt.rmdir()
        tmp.replace(ckpt)
        write_atomic(str(run_dir / LATEST), ckpt.name + "\n")
    dist.barrier()  # every rank may read the marker after this returns
    return ckpt


def load_full_model(
    path: str | os.PathLike, attention_backend: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """``(TP=PP=1 GPTModel with the checkpoint's weights, record, checkpoint dir)`` in this process."""
    ckpt, record = open_checkpoint(path)
    init_single_process()
    (model,) = build_models(record, padded_vocab_size(ckpt), attention_backend)
    load_weights([model], ckpt)
    return model, record, ckpt
