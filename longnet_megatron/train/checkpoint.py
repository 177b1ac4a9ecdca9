"""Checkpoints with megatron.core.dist_checkpointing: save, keep the last K, resume from ``latest``.

Layout of ``checkpoint.dir``::

    iter_0000100/          a complete dist-checkpoint (every rank's shards + common.pt + metadata)
      longnet.json         step, resolved config, model shape, dilated patterns, tokenizer (for export)
    iter_0000200/
    latest                 "iter_0000200": written last, atomically, after the save completed

A save writes into ``iter_XXXXXXX.tmp`` and is renamed only when every rank has finished, so a job
killed mid-save leaves the previous ``latest`` intact; resumption reads only ``latest``.

What a checkpoint holds: the model's and the optimizer's sharded state dicts (the distributed
optimizer in Megatron's ``dp_reshardable`` or ``fully_reshardable`` format), the scheduler, the train
state (step, consumed samples: the data position), every rank's RNG states (Python, NumPy, torch CPU
and CUDA, Megatron's model-parallel tracker), the run's config and the tokenizer description.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"
METADATA = "longnet.json"


def checkpoint_name(step: int) -> str:
    """``iter_0000100``: Megatron-LM's checkpoint directory name."""
    return f"iter_{step:07d}"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(directory: str) -> str | None:
    """The checkpoint ``latest`` names (None when there is none yet)."""
    marker = os.path.join(directory, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        path = os.path.join(directory, f.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{marker} names {path}, which does not exist")
    return path


def read_metadata(path: str) -> dict[str, Any]:
    """A checkpoint's ``longnet.json`` (config, model, tokenizer, step)."""
    with open(os.path.join(path, METADATA)) as f:
        return json.load(f)


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

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
    from megatron.core import tensor_parallel

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
    from megatron.core.optimizer import distrib_optimizer

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
    from megatron.core.optimizer import distrib_optimizer

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


class Checkpointer:
    """Saves and loads the full training state of one run."""

    def __init__(self, directory: str, keep_last: int, optimizer_sharding: str) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.metadata = {
            "distrib_optim_sharding_type": optimizer_sharding,
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
        }

    def _sharded_state(self, chunks, optimizer, *, rng: bool, is_loading: bool) -> dict[str, Any]:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        # Megatron-LM's layout: the unwrapped GPTModel(s) under "model" (or "model0", "model1", ...).
        from longnet_megatron.train.model import unwrap

        models = unwrap(chunks)
        state: dict[str, Any] = {}
        if len(models) == 1:
            state["model"] = models[0].sharded_state_dict(metadata=self.metadata)
        else:
            for i, model in enumerate(models):
                state[f"model{i}"] = model.sharded_state_dict(metadata=self.metadata)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=self.metadata
        )
        if rng:
            rank, world = dist.get_rank(), dist.get_world_size()
            state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
        return state

    def save(
        self, step: int, chunks, optimizer, scheduler, train_state: dict[str, Any], metadata: dict[str, Any]
    ) -> str:
        """Save step ``step``; move ``latest`` to it; delete checkpoints beyond the last K."""
        from megatron.core import dist_checkpointing

        final = os.path.join(self.directory, checkpoint_name(step))
        tmp = final + ".tmp"
        if dist.get_rank() == 0:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        state = self._sharded_state(chunks, optimizer, rng=True, is_loading=False)
        state["scheduler"] = scheduler.state_dict()
        state["train_state"] = dict(train_state)
        state["world_size"] = dist.get_world_size()
        dist_checkpointing.save(state, tmp, validate_access_integrity=True)
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, METADATA), "w") as f:
                json.dump({"step": step, **metadata}, f, indent=2)
            if os.path.exists(final):  # the same step saved again (e.g. end right after an interval save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(os.path.join(self.directory, LATEST), checkpoint_name(step) + "\n")
            self._prune(keep=checkpoint_name(step))
        dist.barrier()
        return final

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        names = sorted(
            n for n in os.listdir(self.directory) if n.startswith("iter_") and not n.endswith(".tmp")
        )
        for name in names[: max(0, len(names) - self.keep_last)]:
            if name != keep:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    @torch.no_grad()  # the optimizer copies into views of parameters that require grad
    def load(self, path: str, chunks, optimizer, scheduler) -> dict[str, Any]:
        """Restore everything from checkpoint ``path``; returns its train state (step, consumed samples)."""
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(path)
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
        state = dist_checkpointing.load(sharded, path)
        from longnet_megatron.train.model import unwrap

        models = unwrap(chunks)
        if len(models) == 1:
            models[0].load_state_dict(state["model"], strict=True)
        else:
            for i, model in enumerate(models):
                model.load_state_dict(state[f"model{i}"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if same_world:
            _set_rng_state(state["rng_state"])
        return dict(state["train_state"])
