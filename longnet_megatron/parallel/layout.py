"""A Megatron parallel layout, its initialisation and LongNet's contiguous CP chunk: one place for the
trainer, exporter, evaluator and test harness.

Importing this module does not import Megatron (start-up of the command-line tools stays light).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from longnet_megatron.compat import enable_cpu_megatron


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron model-parallel sizes; data parallelism takes the remaining factor of the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None

    def model_parallel_size(self) -> int:
        """Ranks in one model replica (tp * pp * cp)."""
        return self.tp * self.pp * self.cp


def initialize_megatron_parallel(layout: ParallelLayout, seed: int | None = 1234) -> None:
    """(Re)initialise Megatron's parallel state with ``layout``; seed its model-parallel RNG unless None.

    Safe to call again in the same processes to switch layout (a previous state is destroyed first).
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )
    if seed is not None:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_single_process() -> None:
    """torch.distributed (gloo, one rank) and Megatron's parallel state for TP=PP=CP=1 here.

    For the tools that run a whole model in one process (export, evaluation). On a machine without
    CUDA, Megatron's CUDA-only calls are redirected to the CPU first. An already initialised process
    group or parallel state is left as it is.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    enable_cpu_megatron()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        initialize_megatron_parallel(ParallelLayout())


def free_port() -> int:
    """A free TCP port on the loopback interface (for a single-host process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def contiguous_cp_chunk(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Chunk ``cp_rank`` of ``cp_size`` equal contiguous chunks of ``tensor`` along ``seq_dim``.

    The one definition of LongNet's context-parallel split (docs/design.md section 4): data loaders,
    RoPE and the attention's position offset (``cp_rank * local_len``) all agree with it.
    """
    length = tensor.shape[seq_dim]
    if length % cp_size:
        raise ValueError(f"sequence length {length} is not divisible by context-parallel size {cp_size}")
    chunk = length // cp_size
    return tensor.narrow(seq_dim, cp_rank * chunk, chunk)
