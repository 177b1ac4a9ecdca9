"""Kernel calls from a plan: large tasks cut to a bounded size, small tasks of one pattern packed together.

A plan has one task per (pattern, head offset, block), so a pattern of dilation r makes r calls; at
short lengths those calls are small and their launch costs dominate. Tasks of one pattern whose blocks
have the same segment length and head count are stacked along the batch dimension into one call (a
gather by index, small by construction); large tasks keep their own call and their views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .indexing import AttentionTask, Selection, index_tensor, split_task

# Tasks with fewer query elements than this are packed (2^23: 16 MiB in bf16, e.g. 32K rows x 2 heads x 128).
PACK_BELOW = 1 << 23


@dataclass(frozen=True, eq=False)
class PackedSelection:
    """Several selections stacked along the batch: ``[M, L, Hs, ...]`` gathered from ``[B, N, H, ...]``.

    ``flat`` holds the index ``(b * N + row) * H + head`` of every selected (row, head) in gather
    order; contiguous tensors are read and written through it with one ``index_select`` /
    ``index_copy_`` / ``index_add_``. Same interface as :class:`~.indexing.Selection`.
    """

    flat: torch.Tensor
    shape: tuple[int, int, int]
    num_heads: int  # H of the tensors it selects from

    @classmethod
    def stack(cls, selections: Sequence[Selection], batch: int, num_positions: int, num_heads: int,
              device: torch.device) -> PackedSelection:  # fmt: skip
        """The selections of ``[batch, num_positions, num_heads, ...]`` tensors, one after another."""
        parts = []
        for sel in selections:
            rows = sel.rows.row_index(device)  # [S, L]
            heads = torch.arange(num_heads, device=device)[sel.heads] if isinstance(sel.heads, slice) else (
                index_tensor(sel.heads, device))  # fmt: skip
            b = torch.arange(batch, device=device)[:, None, None, None]
            flat = (b * num_positions + rows[None, :, :, None]) * num_heads + heads
            parts.append(flat.flatten(0, 1))
        flat = torch.cat(parts)
        return cls(flat.reshape(-1), tuple(flat.shape), num_heads)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, *x.shape[3:])

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows of a per-token ``[B, N]`` tensor as ``[M, L]``."""
        first_head = self.flat.view(self.shape)[:, :, 0]
        return x.reshape(-1)[first_head // self.num_heads]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows and heads of ``x`` as one dense batch ``[M, L, Hs, ...]`` (a copy)."""
        if x.is_contiguous():
            return self._rows(x).index_select(0, self.flat).view(*self.shape, *x.shape[3:])
        n, h = x.shape[1:3]  # strided input: index it directly rather than copying all of it
        picked = x[self.flat // (n * h), self.flat // h % n, self.flat % h]
        return picked.view(*self.shape, *x.shape[3:])

    def view(self, x: torch.Tensor) -> None:
        """Packed selections are never views."""
        return None

    def _target(self, dst: torch.Tensor) -> torch.Tensor:
        if not dst.is_contiguous():
            raise ValueError("packed selections write only into contiguous tensors (the accumulators)")
        return self._rows(dst)

    def put(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite the selected part of ``dst`` with ``value``."""
        self._target(dst).index_copy_(0, self.flat, value.reshape(-1, *dst.shape[3:]).to(dst.dtype))

    def add(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``value`` into the selected part of ``dst``; repeated (row, head) pairs accumulate."""
        self._target(dst).index_add_(0, self.flat, value.reshape(-1, *dst.shape[3:]).to(dst.dtype))


@dataclass(frozen=True, eq=False)
class PackedTask:
    """One kernel call made of several tasks of one pattern."""

    pattern: int
    query: PackedSelection
    key_value: PackedSelection


def kernel_calls(
    tasks: Sequence[AttentionTask],
    shape: tuple[int, int, int, int],
    kv_heads: int,
    device: torch.device,
    max_elements: int,
    pack_below: int | None = None,
) -> list[AttentionTask | PackedTask]:
    """The calls for ``tasks`` on q of ``shape`` ``[B, N, H, D]``, pattern by pattern in plan order.

    Each call's query holds at most ``max_elements`` elements: larger tasks are cut along segments,
    tasks under ``pack_below`` (default :data:`PACK_BELOW`) elements with equal segment length and head count are packed.
    """
    pack_below = PACK_BELOW if pack_below is None else pack_below
    b, n, h, d = shape
    calls: list[AttentionTask | PackedTask] = []
    groups: dict[tuple[int, int], list[AttentionTask]] = {}
    sizes: dict[tuple[int, int], int] = {}

    def flush(key: tuple[int, int]) -> None:
        group = groups.pop(key)
        sizes.pop(key)
        if len(group) == 1:
            calls.append(group[0])
            return
        query = PackedSelection.stack([t.query for t in group], b, n, h, device)
        key_value = PackedSelection.stack([t.key_value for t in group], b, n, kv_heads, device)
        calls.append(PackedTask(group[0].pattern, query, key_value))

    pattern = None
    for task in (part for t in tasks for part in split_task(t, b, h, d, max_elements)):
        if task.pattern != pattern:
            for key in list(groups):
                flush(key)
            pattern = task.pattern
        rows = task.query.rows
        size = b * rows.num_segments * rows.length * task.query.num_heads(h) * d
        if size >= pack_below or task.key_value.rows != rows:
            calls.append(task)
            continue
        key = (rows.length, task.query.num_heads(h))
        if key in groups and sizes[key] + size > max_elements:
            flush(key)
        groups.setdefault(key, []).append(task)
        sizes[key] = sizes.get(key, 0) + size
    for key in list(groups):
        flush(key)
    return calls
