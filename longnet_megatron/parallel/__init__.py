"""How the job is laid out over processes: Megatron's parallel sizes and LongNet's contiguous CP split.

``layout`` holds the parallel sizes, Megatron's initialisation and the one definition of a rank's
contiguous sequence chunk; ``batch`` splits a training batch by it. The distributed attention
algorithm itself lives with the attention (:mod:`longnet_megatron.attention.cp`).
"""

from longnet_megatron.parallel.layout import (
    ParallelLayout,
    contiguous_cp_chunk,
    free_port,
    initialize_megatron_parallel,
)

__all__ = ["ParallelLayout", "contiguous_cp_chunk", "free_port", "initialize_megatron_parallel"]
