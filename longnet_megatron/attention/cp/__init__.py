"""LongNet's distributed dilated attention over a context-parallel group (docs/design.md section 4).

``context_parallel_dilated_attention`` is reached through ``dilated_attention(..., cp_group=...)``;
``last_comm_stats`` reports the bytes a rank sent. The matching contiguous split of a training batch
is :func:`longnet_megatron.parallel.batch.split_batch_for_context_parallel`.
"""

from .algorithm import CommStats, context_parallel_dilated_attention, last_comm_stats
from .plan import ContextParallelPlan, CrossingSegment, plan_context_parallel

__all__ = [
    "CommStats",
    "ContextParallelPlan",
    "CrossingSegment",
    "context_parallel_dilated_attention",
    "last_comm_stats",
    "plan_context_parallel",
]
