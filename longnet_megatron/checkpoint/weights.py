"""Model weights in dist checkpoints: the sharded state of this rank's chunks, checks, load and save.

Tensors are stored under layout-independent keys with their global shapes, so a checkpoint saved with
any TP / PP / CP / DP layout loads into a model built with any other: the model is built for whatever
Megatron parallel state is current (:func:`build_models`, from the checkpoint's record) and
dist_checkpointing is asked for that model's ``sharded_state_dict``. :func:`check_tensors` compares
keys and shapes first, so a checkpoint of another architecture fails with the names of the tensors
that differ instead of a loader traceback.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from torch.distributed.checkpoint.api import CheckpointException

from longnet_megatron.checkpoint.async_save import AsyncSaves, PendingSave
from longnet_megatron.checkpoint.errors import CheckpointError
from longnet_megatron.checkpoint.files import TMP_SUFFIX, checkpoint_name, write_latest
from longnet_megatron.checkpoint.record import (
    RECORD_KEY,
    checkpoint_metadata,
    read_record,
    rebuild_config,
    write_metadata,
)
from longnet_megatron.checkpoint.verify import safe_loading, verify_checkpoint
from longnet_megatron.compat.megatron import async_save_options
from longnet_megatron.model import build_longnet_gpt
from longnet_megatron.parallel.layout import init_single_process

log = logging.getLogger(__name__)

# Top-level names of model tensors in a GPTModel's sharded state dict (optimizer keys differ).
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_WORD_EMBEDDING = "embedding.word_embeddings.weight"


def chunk_key(index: int, count: int) -> str:
    """State-dict key of model chunk ``index`` of ``count``: Megatron-LM's "model" / "model0", ..."""
    return "model" if count == 1 else f"model{index}"


def sharded_model_state(
    models: list[torch.nn.Module], metadata: dict[str, Any] | None = None, *, weights_only: bool = False
) -> dict[str, Any]:
    """This rank's chunks' sharded state dicts under Megatron-LM's keys.

    ``weights_only`` drops ``_extra_state`` (TE/FP8 bookkeeping, not weights; TE and local layers
    disagree on it), so weights load across layer implementations.
    """
    state = {}
    for i, model in enumerate(models):
        sharded = model.sharded_state_dict(metadata=metadata) if metadata else model.sharded_state_dict()
        if weights_only:
            sharded = {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}
        state[chunk_key(i, len(models))] = sharded
    return state


def tensors_metadata(ckpt: Path) -> dict[str, Any]:
    """Checkpoint key -> ShardedTensor without data (global shape, dtype)."""
    with safe_loading():
        return dist_checkpointing.load_tensors_metadata(str(ckpt))


def padded_vocab_size(ckpt: Path) -> int:
    """Rows of the stored word embedding (the vocabulary padded for the saving layout)."""
    meta = tensors_metadata(ckpt)
    if _WORD_EMBEDDING not in meta:
        raise CheckpointError(f"{ckpt}: no {_WORD_EMBEDDING} tensor: not a GPT checkpoint", "foreign")
    return int(meta[_WORD_EMBEDDING].global_shape[0])


def open_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The record of checkpoint ``ckpt`` after the integrity checks (:func:`verify_checkpoint`)."""
    verify_checkpoint(ckpt)
    return read_record(ckpt)


def build_models(
    record: dict[str, Any], padded_vocab: int, attention_backend: str | None = None
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for the current parallel state.

    Local (non-TE) layers: their dist-checkpoint keys equal TE's, and they run everywhere. The
    vocabulary is padded exactly as the checkpoint's (``padded_vocab``) whatever the TP size.
    """
    preset, config = rebuild_config(record, attention_backend)
    tp = config.tensor_model_parallel_size
    if padded_vocab % tp:
        raise CheckpointError(
            f"the stored vocabulary of {padded_vocab} rows does not split over tensor-parallel size {tp}",
            "mismatched",
        )
    # make_vocab_size_divisible_by=1: padded_vocab_size(tp) is then padded_vocab itself.
    preset = preset.replace(vocab_size=padded_vocab, make_vocab_size_divisible_by=1)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    return [
        build_longnet_gpt(
            preset,
            config=config,
            use_te=False,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage if vpp > 1 else None,
        )
        for stage in range(vpp)
    ]


def check_tensors(ckpt: Path, sharded: dict[str, Any], whole_model: bool = True) -> None:
    """Every model tensor ``sharded`` needs is in the checkpoint with its global shape, and (when
    ``sharded`` is the whole model, not one pipeline stage) the checkpoint has no model tensor the
    architecture lacks."""
    stored = tensors_metadata(ckpt)
    wanted = {t.key: tuple(t.global_shape) for t in nested_values(sharded) if isinstance(t, ShardedTensor)}
    wanted = {k: v for k, v in wanted.items() if k.startswith(_MODEL_PREFIXES)}
    problems = []
    for key, shape in sorted(wanted.items()):
        if key not in stored:
            problems.append(f"missing tensor {key}")
        elif tuple(stored[key].global_shape) != shape:
            problems.append(f"{key}: stored {tuple(stored[key].global_shape)}, the model needs {shape}")
    if whole_model:
        extra = sorted(k for k in stored if k.startswith(_MODEL_PREFIXES) and k not in wanted)
        problems += [f"unexpected tensor {k}" for k in extra]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise CheckpointError(f"{ckpt} does not match the architecture of the model: {shown}", "mismatched")


def load_weights(models: list[torch.nn.Module], ckpt: Path) -> None:
    """Load the checkpoint's weights into this rank's model chunks (any saving layout)."""
    sharded = sharded_model_state(models, weights_only=True)
    check_tensors(ckpt, sharded, whole_model=parallel_state.get_pipeline_model_parallel_world_size() == 1)
    with safe_loading():
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    for i, model in enumerate(models):
        result = model.load_state_dict(loaded[chunk_key(i, len(models))], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{ckpt}: loaded state does not fit the model (missing {missing[:4]}, "
                f"unexpected {result.unexpected_keys[:4]})",
                "mismatched",
            )


def save_dist_checkpoint(
    state: dict[str, Any],
    directory: Path,
    step: int,
    meta: dict[str, Any],
    *,
    overwrite: bool,
    async_saves: AsyncSaves | None = None,
    on_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``state`` (collective) as ``directory/iter_<step>`` with ``meta`` as its longnet.json.

    Written into ``iter_<step>.tmp`` and renamed only when every rank has finished, then ``latest``
    moves to it and ``on_commit(final)`` runs on every rank: a save that fails or is killed leaves the
    previous ``latest`` intact. A failure (disk full, permissions) removes the partial save and raises a
    one-line ``unwritable`` :class:`CheckpointError`; on every rank, since the ranks agree on success
    before the rename.

    async_saves: write the shards in the background (:mod:`.async_save`); the rename, ``latest`` and
    ``on_commit`` then happen in ``async_saves.finalize`` once every rank's write completed.
    """
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / (final.name + TMP_SUFFIX)
    rank = dist.get_rank()
    error = None
    if rank == 0:
        try:
            if final.exists() and any(final.iterdir()) and not overwrite:
                raise CheckpointError(f"{final} already exists and is not empty", "mismatched")
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = CheckpointError(f"cannot create {tmp}: {e.strerror or e}", "unwritable")
        except CheckpointError as e:
            error = e
    _agree(error)
    try:
        background = {"async_sharded_save": True, **async_save_options()} if async_saves else {}
        request = dist_checkpointing.save(state, str(tmp), validate_access_integrity=True, **background)
        failure = None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any writer failure is reported alike
        failure = e
    if _any_rank_failed(failure is not None):
        # Diagnosed before the partial save is removed: a full disk is still full then.
        cause = _why_write_failed(failure, directory, state) if failure else "another rank failed to write"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving {final} failed: {cause}; {final.name} was not written", "unwritable"
        ) from failure

    def commit() -> None:
        _commit(tmp, final, meta)
        if on_commit is not None:
            on_commit(final)

    if async_saves is None:
        commit()
    else:
        request.add_finalize_fn(commit)
        async_saves.schedule(request, PendingSave(final, tmp))
    return final


def _commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0 writes longnet.json, renames ``tmp`` to ``final`` and moves ``latest`` (collective)."""
    error = None
    if dist.get_rank() == 0:
        try:
            write_metadata(tmp, meta)
            if final.exists():  # the same step saved again (an end right after an interval save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_latest(final.parent, final.name)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = CheckpointError(f"saving {final} failed: {e.strerror or e}", "unwritable")
    _agree(error)


def _why_write_failed(error: BaseException, directory: Path, state: dict[str, Any]) -> str:
    """What a user can act on when a save failed: the OS error if one surfaced, else what the file
    system says (free space against this rank's share, the process's file-size limit), else the error.

    torch's shard writer reports a full disk as a zip-writer assertion ("unexpected pos ..."), not as
    ENOSPC, so the cause is looked up rather than parsed.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    needed = sum(
        t.data.numel() * t.data.element_size()
        for t in nested_values(state)
        if isinstance(t, ShardedTensor) and t.data is not None
    )
    free = shutil.disk_usage(directory).free
    if free < needed:
        return f"No space left on device ({free / 2**20:.1f} MiB free, this rank writes about {needed / 2**20:.1f} MiB)"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"File too large (the process's file-size limit, ulimit -f, is {limit} bytes)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _any_rank_failed(failed: bool) -> bool:
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _agree(error: CheckpointError | None) -> None:
    """Raise ``error`` on every rank when rank 0 has one (a barrier otherwise)."""
    box = [None if error is None else (str(error), error.kind)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(*box[0])


def save_weights(
    models: list[torch.nn.Module], directory: str | os.PathLike, record: dict[str, Any], step: int = 0
) -> Path:
    """Save this rank's chunks as a weights-only ``directory/iter_<step>`` (collective), ``latest`` to it.

    ``directory`` plays the trainer's ``checkpoint.dir``. The record is rewritten with the current
    layout. No optimizer, scheduler or RNG state: training started from it (``checkpoint.init_from``)
    starts a fresh optimizer.
    """
    record = dict(record)
    record["layout"] = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }
    state = {**sharded_model_state(models, weights_only=True), RECORD_KEY: record, "iteration": step}
    meta = checkpoint_metadata(step, record, weights_only=True)
    return save_dist_checkpoint(state, Path(directory), step, meta, overwrite=False)


def load_full_model(
    ckpt: Path, attention_backend: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(TP=PP=1 GPTModel with the checkpoint's weights, record)`` in this process (one gloo rank)."""
    record = open_checkpoint(ckpt)
    init_single_process()
    (model,) = build_models(record, padded_vocab_size(ckpt), attention_backend)
    load_weights([model], ckpt)
    return model, record
