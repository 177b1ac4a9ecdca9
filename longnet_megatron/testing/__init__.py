"""Helpers for tests: run Megatron code in several CPU (gloo) processes."""

from longnet_megatron.testing.distributed import (
    DistributedWorkerError,
    ParallelLayout,
    initialize_megatron_parallel,
    run_distributed,
)

__all__ = ["DistributedWorkerError", "ParallelLayout", "initialize_megatron_parallel", "run_distributed"]
