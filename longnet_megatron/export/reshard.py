"""Re-save a checkpoint for another TP / PP / VPP layout (continued training on another cluster shape).

Dist checkpoints are layout-independent: a trainer with any layout can load any LongNet checkpoint
directly. Resharding still has uses: a checkpoint whose files match the new cluster's ranks, a
weights-only copy for another team, or a check that the new layout builds and loads before a job is
queued. Each rank of the target layout builds its model chunks, loads its shards of the source and
saves them (:mod:`longnet_megatron.checkpoint.weights`).

Weights only: optimizer, scheduler and RNG state are not carried, so training from the result
(``checkpoint.init_from``) starts a fresh optimizer (warm up the learning rate again). To keep the
optimizer, skip resharding and load the ORIGINAL checkpoint with the new layout: Megatron's
distributed optimizer state in ``fully_reshardable`` format is itself layout-independent.

The target layout is checked against the source's model record before any process starts
(:func:`check_layout`). Launch: under ``torchrun`` (one process per rank), or, on a machine without
GPUs, :func:`reshard_cpu` spawns gloo ranks itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as torch_mp

from longnet_megatron.checkpoint import CheckpointError, checkpoint_name, find_checkpoint
from longnet_megatron.checkpoint.record import read_metadata
from longnet_megatron.checkpoint.weights import (
    build_models,
    load_weights,
    open_checkpoint,
    padded_vocab_size,
    save_weights,
)
from longnet_megatron.compat import enable_cpu_megatron
from longnet_megatron.parallel.layout import ParallelLayout, free_port, initialize_megatron_parallel


def check_layout(record: dict[str, Any], layout: ParallelLayout, where: str) -> None:
    """Raise a ``mismatched`` :class:`CheckpointError` naming the option when the model cannot be split
    as ``layout`` asks (heads, kv groups and layers must divide)."""
    preset = record["preset"]
    heads, layers = preset["num_attention_heads"], preset["num_layers"]
    groups = record["config"].get("num_query_groups") or heads
    stages = layout.pp * (layout.vpp or 1)
    problems = []
    if heads % layout.tp:
        problems.append(f"--tp {layout.tp} does not divide the {heads} attention heads")
    if groups % layout.tp and layout.tp % groups:
        problems.append(f"--tp {layout.tp} and the {groups} key/value groups: one must divide the other")
    if layers % stages:
        what = f"--pp {layout.pp}" + (f" x --vpp {layout.vpp}" if layout.vpp else "")
        problems.append(f"{what} does not divide the {layers} layers")
    if layout.vpp is not None and layout.pp < 2:
        problems.append(f"--vpp {layout.vpp} needs --pp >= 2")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}", "mismatched")


def check_output_free(run_dir: str | os.PathLike, step: int) -> None:
    """Refuse an output that already holds the checkpoint to be written (before any work)."""
    target = Path(run_dir) / checkpoint_name(step)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(
            f"{target} already exists and is not empty: choose another output", "mismatched"
        )
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} exists and is not a directory", "mismatched")


def reshard_here(ckpt: Path, run_dir: str | os.PathLike, iteration: int) -> Path:
    """Collective, on every rank of the (already initialised) target layout: load ``ckpt``, save it
    into ``run_dir`` as ``iter_<iteration>`` with the current layout."""
    record = open_checkpoint(ckpt)
    models = build_models(record, padded_vocab_size(ckpt))
    load_weights(models, ckpt)
    return save_weights(models, run_dir, record, iteration)


def prepare(source: str | os.PathLike, run_dir: str | os.PathLike, layout: ParallelLayout,
            iteration: int | None) -> tuple[Path, int]:  # fmt: skip
    """The source checkpoint and the step to write, after every check that needs no process group."""
    ckpt = find_checkpoint(source)
    record = open_checkpoint(ckpt)
    check_layout(record, layout, str(ckpt))
    step = read_metadata(ckpt)["step"] if iteration is None else iteration
    check_output_free(run_dir, step)
    return ckpt, step


def _reshard_rank(local_rank: int, world_size: int, port: int, layout: ParallelLayout, ckpt: str,
                  run_dir: str, iteration: int) -> None:  # fmt: skip
    enable_cpu_megatron()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world_size
    )
    try:
        initialize_megatron_parallel(layout)
        reshard_here(Path(ckpt), run_dir, iteration)
    finally:
        dist.destroy_process_group()


def reshard_cpu(source: str | os.PathLike, run_dir: str | os.PathLike, layout: ParallelLayout,
                iteration: int | None = None) -> Path:  # fmt: skip
    """Reshard with ``tp * pp`` gloo processes on this machine (the CPU path of ``longnet-convert reshard``).

    Everything is checked in this process first, so bad input fails before anything spawns. The ranks
    are not daemonic: Megatron's checkpoint writer starts processes of its own.
    """
    ckpt, step = prepare(source, run_dir, layout, iteration)
    world = layout.model_parallel_size()
    try:
        torch_mp.spawn(
            _reshard_rank,
            args=(world, free_port(), layout, str(ckpt), str(run_dir), step),
            nprocs=world,
            join=True,
        )
    except torch_mp.ProcessRaisedException as e:
        raise CheckpointError(f"resharding {ckpt} to {layout} failed:\n{e}", "mismatched") from e
    return Path(run_dir) / checkpoint_name(step)


def reshard_under_torchrun(source: str | os.PathLike, run_dir: str | os.PathLike, layout: ParallelLayout,
                           iteration: int | None = None) -> Path:  # fmt: skip
    """Reshard with the ranks torchrun launched (one per GPU, or gloo on CPU): they must be tp * pp."""
    import torch

    world = int(os.environ["WORLD_SIZE"])
    if world != layout.model_parallel_size():
        raise CheckpointError(
            f"--tp {layout.tp} x --pp {layout.pp} = {layout.model_parallel_size()} ranks, but torchrun "
            f"launched {world}: launch as many ranks as the target layout has",
            "mismatched",
        )
    ckpt, step = prepare(source, run_dir, layout, iteration)
    enable_cpu_megatron()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        initialize_megatron_parallel(layout)
        return reshard_here(ckpt, run_dir, step)
    finally:
        dist.destroy_process_group()
