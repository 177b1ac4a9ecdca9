"""The trainer's checkpoints: everything a run needs to continue bit-exactly, saved and restored.

A training checkpoint holds the model's and the optimizer's sharded state dicts (the distributed
optimizer in Megatron's ``dp_reshardable`` or ``fully_reshardable`` format), the lr scheduler, the
train state (step, consumed samples: the data position), every rank's RNG states (Python, NumPy,
torch CPU and CUDA, Megatron's model-parallel tracker) and, in ``longnet.json``, the model record and
the job's resolved config. Saves go through :func:`~.weights.save_dist_checkpoint` (temporary name,
rename when complete, ``latest`` last), optionally in the background (:mod:`.async_save`); the last K
are kept.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer
from megatron.core.utils import unwrap_model

from longnet_megatron.checkpoint.async_save import AsyncSaves
from longnet_megatron.checkpoint.errors import CheckpointError
from longnet_megatron.checkpoint.files import checkpoint_dirs
from longnet_megatron.checkpoint.record import RECORD_KEY, checkpoint_metadata, read_metadata
from longnet_megatron.checkpoint.verify import read_common, safe_loading, verify_checkpoint
from longnet_megatron.checkpoint.weights import chunk_key, save_dist_checkpoint, sharded_model_state

log = logging.getLogger(__name__)

# The preset fields whose change makes a checkpoint unusable for a run (its tensors no longer fit).
_ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "tie_embeddings",
)


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialize_optimizer_state(optimizer) -> None:
    """Create the torch Adam states of a fresh distributed optimizer before a load.

    Without Apex / TE (the CPU path), DistributedOptimizer.state_dict() reads the step count from the
    torch optimizer's per-parameter states, which exist only after a first step; Megatron fills them
    with dummy values itself only for Megatron-FSDP. The dummy step touches the parameters, which the
    load then overwrites (model weights, then the optimizer's main parameters and moments).
    """
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, distrib_optimizer.DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer, saved: Any) -> None:
    """Give every torch Adam state its own step tensor with the saved count (CPU path only).

    Without Apex / TE, DistributedOptimizer.load_state_dict assigns one shared step tensor to all
    parameters and then overwrites it from the dummy-initialised state, so the resumed bias correction
    would be wrong (and torch's foreach Adam would advance the shared tensor once per parameter).
    """
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    saved_list = saved if isinstance(saved, list) else [saved]
    for opt, opt_state in zip(optimizers, saved_list):
        groups = opt_state["optimizer"]["param_groups"]
        steps = {g["step"] for g in groups if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in opt.optimizer.state.values():
            param_state["step"] = torch.tensor(step)


def check_same_architecture(ckpt: Path, record: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise a ``mismatched`` :class:`CheckpointError` naming the fields in which the checkpoint's
    model differs from the run's (``expected``: the run's model record)."""
    saved, wanted = record["preset"], expected["preset"]
    diffs = [
        f"{name} {saved.get(name)} (the run: {wanted.get(name)})"
        for name in _ARCHITECTURE_FIELDS
        if saved.get(name) != wanted.get(name)
    ]
    if diffs:
        raise CheckpointError(
            f"{ckpt} holds another model: {', '.join(diffs)}; resume with the checkpoint's settings, or "
            "start a new run directory (checkpoint.init_from loads weights only when they fit)",
            "mismatched",
        )


class TrainingCheckpointer:
    """Saves and loads the full training state of one run in ``directory`` (``checkpoint.dir``)."""

    def __init__(
        self, directory: str, keep_last: int, optimizer_sharding: str, async_save: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        # checkpoint.async_save: shards written in the background, committed by finalize().
        self.async_saves = AsyncSaves() if async_save else None
        self.metadata = {
            "distrib_optim_sharding_type": optimizer_sharding,
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
        }

    def _sharded_state(self, chunks, optimizer, *, rng: bool, is_loading: bool) -> dict[str, Any]:
        state = sharded_model_state(unwrap_model(chunks), self.metadata)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=self.metadata
        )
        if rng:
            rank, world = dist.get_rank(), dist.get_world_size()
            state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
        return state

    def save(
        self,
        step: int,
        chunks,
        optimizer,
        scheduler,
        train_state: dict[str, Any],
        record: dict[str, Any],
        job: dict[str, Any],
    ) -> Path:
        """Save step ``step``; move ``latest`` to it; delete checkpoints beyond the last K.

        With ``async_save`` the earlier save in flight is finished first, this one's shards are written
        in the background, and ``latest`` and the pruning follow in :meth:`finalize`.
        """
        self.finalize(blocking=True)
        state = self._sharded_state(chunks, optimizer, rng=True, is_loading=False)
        state["scheduler"] = scheduler.state_dict()
        state["train_state"] = dict(train_state)
        state["world_size"] = dist.get_world_size()
        meta = checkpoint_metadata(step, record, weights_only=False, job=job)
        return save_dist_checkpoint(
            state,
            self.directory,
            step,
            meta,
            overwrite=True,
            async_saves=self.async_saves,
            on_commit=self._after_commit,
        )

    def finalize(self, blocking: bool) -> list[Path]:
        """Commit the background saves every rank has finished (``blocking``: all of them); returns
        the committed checkpoints (collective; nothing to do without ``async_save``)."""
        return self.async_saves.finalize(blocking) if self.async_saves else []

    def _after_commit(self, final: Path) -> None:
        if dist.get_rank() == 0:
            self._prune(keep=final)
        dist.barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        names = checkpoint_dirs(self.directory)
        for path in names[: max(0, len(names) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    @torch.no_grad()  # the optimizer copies into views of parameters that require grad
    def load(
        self, path: Path, chunks, optimizer, scheduler, expected_record: dict[str, Any]
    ) -> dict[str, Any]:
        """Restore everything from checkpoint ``path``; returns its train state (step, consumed samples).

        The checkpoint is verified and its record compared with the run's (``expected_record``)
        before anything is read into the model: a weights-only checkpoint or one of another
        architecture is a one-line :class:`CheckpointError`.
        """
        path = Path(path)
        verify_checkpoint(path)
        meta = read_metadata(path)
        if meta.get("weights_only"):
            raise CheckpointError(
                f"{path} holds weights only (written by longnet-convert: no optimizer, scheduler or data "
                f"position): start from it with checkpoint.init_from={path}, not checkpoint.load",
                "mismatched",
            )
        check_same_architecture(path, meta[RECORD_KEY], expected_record)
        common = read_common(path)
        same_world = common.get("world_size") == dist.get_world_size()
        if not same_world and dist.get_rank() == 0:
            log.warning(
                "%s was saved by %s ranks, this run has %s: RNG states are not restored "
                "(dropout draws will differ from an uninterrupted run)",
                path,
                common.get("world_size"),
                dist.get_world_size(),
            )
        _materialize_optimizer_state(optimizer)
        sharded = self._sharded_state(chunks, optimizer, rng=same_world, is_loading=True)
        with safe_loading():
            state = dist_checkpointing.load(sharded, str(path))
        models = unwrap_model(chunks)
        for i, model in enumerate(models):
            model.load_state_dict(state[chunk_key(i, len(models))], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if same_world:
            _set_rng_state(state["rng_state"])
        return dict(state["train_state"])
