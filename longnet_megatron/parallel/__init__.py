"""Parallel algorithms specific to LongNet: context parallelism over Megatron's CP group.

``context_parallel_dilated_attention`` is LongNet's distributed dilated attention (reached through
``dilated_attention(..., cp_group=...)``); ``last_comm_stats`` reports the bytes a rank sent.
``longnet_megatron.parallel.batch.split_batch_for_context_parallel`` is the matching contiguous split
of a training batch (kept out of this namespace so the attention path does not import Megatron).
"""

from longnet_megatron.parallel.context_parallel import (
    CommStats,
    context_parallel_dilated_attention,
    last_comm_stats,
)

__all__ = [
    "CommStats",
    "context_parallel_dilated_attention",
    "last_comm_stats",
]
