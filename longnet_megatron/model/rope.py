"""Rotary embeddings with global positions under LongNet's contiguous context-parallel split.

Megatron's RotaryEmbedding computes the angles of the whole (global) sequence and, under context
parallelism, keeps this rank's two zig-zag chunks (``get_pos_emb_on_this_cp_rank``), matching the
load-balanced split Megatron uses for dense causal attention. LongNet splits the sequence into
CONTIGUOUS chunks (docs/design.md section 4), so the angles must be sliced the same way, or tokens would be
rotated by another rank's positions.

With ``reset_position_ids`` (positions restarting at each document), :meth:`at_positions` gives each
token the angles of its own position, per sequence of the batch (Megatron's RoPE ignores position
ids in the sbhd layout).
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

    def at_positions(self, position_ids: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """Angles ``[s, b, 1, dim]`` of the positions ``position_ids`` ``[b, s]`` (each below ``max_seq_len``).

        Rows of Megatron's own table (:meth:`get_emb`), so they equal what :meth:`forward` gives a token
        at that position.
        """
        table = self._table(max_seq_len)  # [max_seq_len, 1, 1, dim]
        return table[position_ids.t().to(table.device)][:, :, 0, 0][:, :, None, :]

    @lru_cache(maxsize=4)  # noqa: B019 - one table per sequence length, for the module's lifetime
    def _table(self, max_seq_len: int) -> torch.Tensor:
        return self.get_emb(max_seq_len)
