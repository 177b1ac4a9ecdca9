"""Re-save a checkpoint for another TP / PP / VPP layout (continued training on another cluster shape).

Dist checkpoints are layout-independent: a trainer with any layout can load any LongNet checkpoint
directly. Resharding still has uses: a checkpoint whose files match the new cluster's ranks, a
weights-only copy for another team, or a check that the new layout builds and loads before a job is
queued. Each rank of the target layout builds its model chunks, loads its shards of the source
(:func:`~longnet_megatron.export.checkpoint_io.load_weights`) and saves them
(:func:`~longnet_megatron.export.checkpoint_io.save_checkpoint`).

Weights only: optimizer, scheduler and RNG state are not carried, so training resumed from the result
starts a fresh optimizer (warm up the learning rate again). To keep the optimizer, skip resharding
and load the ORIGINAL checkpoint with the new layout: Megatron's distributed optimizer saves its
state as ``fully_sharded_model_space`` by default, which is itself layout-independent.

Launch: under ``torchrun`` (one process per rank, Megatron's parallel state initialised here), or,
on a machine without GPUs, :func:`reshard_cpu` spawns gloo ranks itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from longnet_megatron.export.checkpoint_io import (
    build_models,
    load_weights,
    open_checkpoint,
    padded_vocab_size,
    read_common,
    save_checkpoint,
)
from longnet_megatron.train.checkpoint import checkpoint_name


def source_iteration(ckpt: Path) -> int:
    """The step a checkpoint was saved at: this package's ``iteration`` or the trainer's train state."""
    common = read_common(ckpt)
    if "iteration" in common:
        return int(common["iteration"])
    return int(common.get("train_state", {}).get("step", 0))


def reshard_here(source: str | os.PathLike, run_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """Collective, on every rank of the (already initialised) target layout: load ``source``, save
    it into ``run_dir`` with the current layout. ``iteration`` defaults to the source's."""
    ckpt, record = open_checkpoint(source)
    if iteration is None:
        iteration = source_iteration(ckpt)
    models = build_models(record, padded_vocab_size(ckpt))
    load_weights(models, ckpt)
    return save_checkpoint(models, run_dir, record, iteration)


def _reshard_rank(
    local_rank: int, world_size: int, port: int, layout, source: str, run_dir: str, iteration: int | None
) -> None:
    import torch.distributed as dist

    from longnet_megatron.compat import enable_cpu_megatron
    from longnet_megatron.parallel.layout import initialize_megatron_parallel

    enable_cpu_megatron()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world_size
    )
    try:
        initialize_megatron_parallel(layout)
        reshard_here(source, run_dir, iteration)
    finally:
        dist.destroy_process_group()


def reshard_cpu(
    source: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    iteration: int | None = None,
) -> Path:
    """Reshard with ``tp * pp`` gloo processes on this machine (the CPU path of ``longnet-convert reshard``).

    The source is checked in this process first, so a bad checkpoint fails before anything spawns.
    The ranks are not daemonic: Megatron's checkpoint writer forks processes of its own.
    """
    import torch.multiprocessing as tmp

    from longnet_megatron.export.errors import ConversionError
    from longnet_megatron.parallel.layout import ParallelLayout, free_port

    ckpt, _ = open_checkpoint(source)
    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp)
    world = layout.model_parallel_size()
    try:
        tmp.spawn(
            _reshard_rank,
            args=(world, free_port(), layout, str(source), str(run_dir), iteration),
            nprocs=world,
            join=True,
        )
    except tmp.ProcessRaisedException as e:
        raise ConversionError(
            f"resharding {source} to tp={tp} pp={pp} vpp={vpp} failed:\n{e}", "mismatched"
        ) from e
    if iteration is None:
        iteration = source_iteration(ckpt)
    return Path(run_dir) / checkpoint_name(iteration)
