"""Rotary embeddings with global positions under LongNet's contiguous context-parallel split.

Megatron's RotaryEmbedding computes the angles of the whole (global) sequence and, under context
parallelism, keeps this rank's two zig-zag chunks (``get_pos_emb_on_this_cp_rank``), matching the
load-balanced split Megatron uses for dense causal attention. LongNet splits the sequence into
CONTIGUOUS chunks (docs/design.md section 4), so the angles must be sliced the same way, or tokens would be
rotated by another rank's positions.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from longnet_megatron.parallel.layout import contiguous_cp_chunk


class ContiguousCPRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding, sliced contiguously (not zig-zag) by context-parallel rank."""

    @lru_cache(maxsize=32)  # noqa: B019 - mirrors Megatron's cached forward; modules live for the run
    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Angles ``[local_seq, 1, 1, dim]`` of this rank's contiguous chunk of ``max_seq_len`` positions."""
        if packed_seq:
            raise NotImplementedError("packed sequences are not supported by LongNet models")
        emb = self.get_emb(max_seq_len, offset)
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = contiguous_cp_chunk(emb, 0, cp_group.rank(), cp_group.size())
        return emb
