"""Start torch.distributed and Megatron's parallel_state from the launcher's environment.

Launchers and the variables they set:

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* srun (one task per GPU, ``launch/pretrain.sh``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  with ``MASTER_ADDR`` / ``MASTER_PORT`` exported by the batch script;
* nothing: one process on 127.0.0.1.

NCCL on CUDA (one GPU per local rank), gloo on CPU with Megatron's CUDA-assuming code redirected by
:func:`longnet_megatron.compat.enable_cpu_megatron`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from longnet_megatron.compat import enable_cpu_megatron
from longnet_megatron.parallel.layout import free_port, initialize_megatron_parallel
from longnet_megatron.train.config import JobConfig


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def world_from_env(env: dict[str, str] | None = None) -> World:
    """Rank, world size and rendezvous address from torchrun's or SLURM's variables (else one process).

    An already initialised process group (a test harness, a notebook) is taken as it is.
    """
    import torch.distributed as dist

    if env is None and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), 0, "", 0)
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        return World(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port())
    if size > 1 and "MASTER_ADDR" not in env:
        raise RuntimeError(
            f"rank {rank} of {size}: MASTER_ADDR is not set. Launch through torchrun, launch/local.sh or "
            "launch/pretrain.sh (which export MASTER_ADDR/MASTER_PORT)"
        )
    return World(rank, size, local, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))


def setup_device() -> torch.device:
    """CUDA device of this local rank, or the CPU with Megatron's CUDA calls redirected."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
        return torch.device("cuda", torch.cuda.current_device())
    enable_cpu_megatron()
    return torch.device("cpu")


def start_process_group(world: World, timeout_minutes: float) -> torch.device:
    """This rank's device and the process group (nccl on CUDA, gloo on CPU), unless one is running."""
    import torch.distributed as dist

    device = setup_device()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{world.master_addr}:{world.master_port}",
            rank=world.rank,
            world_size=world.world_size,
            timeout=timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return device


def init_distributed(job: JobConfig, world: World) -> torch.device:
    """Process group (nccl on CUDA, gloo on CPU), then Megatron's parallel_state with the job's layout."""
    device = start_process_group(world, job.run.timeout_minutes)
    initialize_megatron_parallel(job.layout, seed=None)  # the trainer seeds after building its config
    return device


def shutdown_distributed() -> None:
    """Tear down Megatron's groups and the process group (end of run)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
