"""A Megatron parallel layout and its initialisation: one place for trainer, exporter and test harness.

Importing this module does not import Megatron (the attention path must stay light).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


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


def free_port() -> int:
    """A free TCP port on the loopback interface (for a single-host process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
