"""Split a training batch over the context-parallel ranks: contiguous chunks, not Megatron's zig-zag.

Megatron's ``get_batch_on_this_cp_rank`` gives rank c chunks c and 2*cp-1-c of 2*cp (zig-zag), which
balances dense causal attention. LongNet's distributed attention (docs/design.md section 4) needs rank c to
hold the contiguous chunk ``[c*n, (c+1)*n)`` so that global positions, RoPE angles and dilated
selection agree; the one definition of that chunk is ``contiguous_cp_chunk``. Dilated attention's cost
per query does not grow with its position, so the contiguous split is balanced as well.
"""

from __future__ import annotations

import torch

from longnet_megatron.parallel.layout import contiguous_cp_chunk

# Megatron's batches carry a [b, 1, s, s] mask whose query dimension is 2 (the key dimension stays
# whole, like Megatron's own split); everything else is [b, s, ...].
_SEQ_DIM_OVERRIDES = {"attention_mask": 2}


def split_batch_for_context_parallel(
    batch: dict[str, torch.Tensor | None], cp_rank: int, cp_size: int, seq_dim: int = 1
) -> dict[str, torch.Tensor | None]:
    """This rank's contiguous chunk of every sequence tensor of ``batch`` (tokens, labels, loss_mask,
    position_ids, ...); None values pass through. With ``cp_size == 1`` the batch is returned as is.

    The attention layer must then be called with ``position_offset = cp_rank * local_len``, which
    ``DilatedCoreAttention`` does.
    """
    if cp_size == 1:
        return dict(batch)
    return {
        key: None
        if value is None
        else contiguous_cp_chunk(value, _SEQ_DIM_OVERRIDES.get(key, seq_dim), cp_rank, cp_size)
        for key, value in batch.items()
    }


def split_batch_for_this_cp_rank(batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """:func:`split_batch_for_context_parallel` with Megatron's current CP rank and size."""
    from megatron.core import parallel_state

    return split_batch_for_context_parallel(
        batch,
        parallel_state.get_context_parallel_rank(),
        parallel_state.get_context_parallel_world_size(),
    )
