"""Which dilated keys and values context-parallel ranks exchange: pure index arithmetic, no communication.

Layout (docs/design.md section 4): the sequence is split into CONTIGUOUS chunks of n tokens; CP rank c holds
global positions ``[base + c*n, base + (c+1)*n)`` (``base`` = 0 in training). Positions and heads are
global, so every rank applies the single-rank selection rule of ``attention.indexing`` unchanged.

* Every rank runs ``plan_tasks`` on its own chunk: segments inside the chunk are complete there, and a
  segment that crosses a chunk boundary contributes its local part (local queries x local keys, causal
  square when causal). That is exactly the single-rank path with ``position_offset``.
* A segment that crosses a boundary is a :class:`CrossingSegment`: for each head offset, the local
  queries additionally attend the selected keys that the other members hold. Those arrive in one
  message per (pattern, peer): the sender's selected k and v rows of the shared segment, all head
  offsets, the distinct kv heads each offset reads. Under causal attention only earlier ranks' keys are
  visible, so keys only travel forward (to later members) and their gradients only backward.

Row counts of every member are computed here from arithmetic, so sender and receiver agree on message
sizes (ragged segments, ``n % r != 0``, ``w % r != 0``) without exchanging counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import DilatedAttentionConfig
from ..indexing import (
    AttentionTask,
    RowBlock,
    Selection,
    heads_for_offset,
    kv_heads_for,
    plan_tasks,
    segment_row_blocks,
)


@dataclass(frozen=True)
class OffsetExchange:
    """One head offset of a crossing segment.

    query:     this rank's selected rows of the segment with the offset's query heads (None: no rows).
    key_value: the same rows with the DISTINCT kv heads those queries read: what this rank sends.
    kv_heads:  how many distinct kv heads travel per row.
    expand:    query head j reads distinct kv head ``expand[j]`` (grouped-query attention); None when
               the distinct kv heads already line up one-to-one with the query heads.
    rows:      selected rows each member holds, in member order.
    """

    offset: int
    query: Selection | None
    key_value: Selection | None
    kv_heads: int
    expand: tuple[int, ...] | None
    rows: tuple[int, ...]


@dataclass(frozen=True)
class CrossingSegment:
    """A segment of one pattern shared by several consecutive CP ranks, seen from this rank.

    sources: members whose keys this rank's queries read (earlier members only, when causal).
    targets: members whose queries read this rank's keys.
    """

    pattern: int
    segment: int
    members: tuple[int, ...]
    offsets: tuple[OffsetExchange, ...]
    sources: tuple[int, ...]
    targets: tuple[int, ...]

    def message_numel(self, member: int, batch: int, head_dim: int) -> int:
        """Elements of the k-and-v message that ``member`` sends (its rows, every offset)."""
        index = self.members.index(member)
        return 2 * batch * head_dim * sum(off.rows[index] * off.kv_heads for off in self.offsets)

    def unpack(
        self, buffer: torch.Tensor, member: int, batch: int, head_dim: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views ``(k, v)`` of shape ``[batch, rows, kv_heads, head_dim]`` per offset of ``member``'s message.

        The same layout carries dk, dv back to ``member`` in the backward pass.
        """
        index = self.members.index(member)
        views, start = [], 0
        for off in self.offsets:
            shape = (batch, off.rows[index], off.kv_heads, head_dim)
            size = shape[0] * shape[1] * shape[2] * shape[3]
            k = buffer[start : start + size].view(shape)
            v = buffer[start + size : start + 2 * size].view(shape)
            views.append((k, v))
            start += 2 * size
        return views


@dataclass(frozen=True)
class ContextParallelPlan:
    """Everything one CP rank computes and exchanges for one layer shape.

    rank:     this rank's index in the CP group.
    tasks:    ``plan_tasks`` of the local chunk (all local queries x local keys, every pattern).
    crossing: segments shared with other ranks, in (pattern, segment) order on every rank.
    """

    rank: int
    tasks: tuple[AttentionTask, ...]
    crossing: tuple[CrossingSegment, ...]


def _distinct_kv_heads(
    query_heads: slice, num_heads: int, num_kv_heads: int
) -> tuple[slice | tuple[int, ...], int, tuple[int, ...] | None]:
    """Distinct kv heads read by ``query_heads``, their count, and the query -> distinct map."""
    kv = kv_heads_for(query_heads, num_heads, num_kv_heads)
    if isinstance(kv, slice):
        return kv, len(range(num_kv_heads)[kv]), None
    distinct = tuple(dict.fromkeys(kv))
    expand = tuple(distinct.index(h) for h in kv)
    if expand == tuple(range(len(distinct))):
        expand = None
    return distinct, len(distinct), expand


def _part_block(w: int, r: int, offset: int, lo: int, hi: int) -> RowBlock | None:
    """The selected rows of ``[lo, hi)`` (inside one segment) as one block relative to ``lo``."""
    blocks = segment_row_blocks(w, r, offset, lo, hi - lo)
    if len(blocks) > 1:
        raise AssertionError(f"[{lo}, {hi}) spans more than one segment of length {w}")
    return blocks[0] if blocks else None


def _offset_exchange(
    w: int,
    r: int,
    offset: int,
    query_heads: slice,
    kv: tuple[slice | tuple[int, ...], int, tuple[int, ...] | None],
    parts: list[tuple[int, int]],
    mine: tuple[int, int],
    chunk_start: int,
) -> OffsetExchange:
    """One head offset of a crossing segment whose members hold ``parts`` (global ``[lo, hi)``)."""
    kv_heads, count, expand = kv
    rows = []
    for lo, hi in parts:
        block = _part_block(w, r, offset, lo, hi)
        rows.append(0 if block is None else block.length)
    query = key_value = None
    block = _part_block(w, r, offset, *mine)
    if block is not None:
        local = dataclasses.replace(block, start=block.start + mine[0] - chunk_start)
        query, key_value = Selection(local, query_heads), Selection(local, kv_heads)
    return OffsetExchange(offset, query, key_value, count, expand, tuple(rows))


def plan_context_parallel(
    config: DilatedAttentionConfig,
    num_positions: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    head_offset: int,
    position_offset: int,
    cp_rank: int,
    cp_size: int,
) -> ContextParallelPlan:
    """The plan of CP rank ``cp_rank`` holding ``num_positions`` tokens from global ``position_offset``.

    Every rank holds the same number of tokens, and ``position_offset = base + cp_rank * num_positions``
    with a base common to the group (0 for a sequence starting at position 0).
    """
    n = num_positions
    base = position_offset - cp_rank * n
    if n <= 0 or base < 0 or not 0 <= cp_rank < cp_size:
        raise ValueError(
            f"context parallelism needs position_offset = base + cp_rank * local_len with base >= 0; got "
            f"position_offset={position_offset}, cp_rank={cp_rank}, cp_size={cp_size}, local_len={n}"
        )
    tasks = plan_tasks(
        config, n, num_heads, num_kv_heads, head_offset=head_offset, position_offset=position_offset
    )
    seq_end = base + cp_size * n
    my_lo, my_hi = position_offset, position_offset + n
    crossing = []
    for pattern, (w, r) in enumerate(config.patterns):
        for segment in sorted({my_lo // w, (my_hi - 1) // w}):
            seg_lo, seg_hi = max(segment * w, base), min((segment + 1) * w, seq_end)
            members = tuple(range((seg_lo - base) // n, (seg_hi - 1 - base) // n + 1))
            if len(members) == 1:
                continue
            parts = [(max(seg_lo, base + m * n), min(seg_hi, base + (m + 1) * n)) for m in members]
            mine = parts[members.index(cp_rank)]
            offsets = []
            for offset in range(r):
                q_heads = heads_for_offset(num_heads, r, offset, head_offset)
                if q_heads is not None:
                    kv = _distinct_kv_heads(q_heads, num_heads, num_kv_heads)
                    offsets.append(_offset_exchange(w, r, offset, q_heads, kv, parts, mine, my_lo))
            earlier = tuple(m for m in members if m < cp_rank)
            later = tuple(m for m in members if m > cp_rank)
            visible = earlier if config.causal else earlier + later
            readers = later if config.causal else earlier + later
            crossing.append(CrossingSegment(pattern, segment, members, tuple(offsets), visible, readers))
    return ContextParallelPlan(cp_rank, tuple(tasks), tuple(crossing))
