"""Which rows and heads each dilated pattern reads, by GLOBAL position and GLOBAL head.

docs/design.md section 1: in pattern (w, r), query head h has offset o = h mod r, and position p is selected
iff (p mod w) mod r == o; selected positions attend within their segment [s*w, (s+1)*w).

The tensors seen here are local slices: token 0 is global position ``position_offset`` and head 0 is
global head ``head_offset``, so tensor- and context-parallel callers get the global pattern. For one
(pattern, offset) the selected rows of all interior segments have one common length; the clipped first
and last segments form blocks of their own. Every block is therefore a dense batch of equal-length
sequences that a fused kernel takes as is, with no padding and no mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import DilatedAttentionConfig


def add_at(dst: torch.Tensor, index: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
    """``dst[index] += value`` for ``[B, N, H, ...]`` ``dst``, repeated entries summed.

    ``index`` (batch, row, head) broadcasts to ``value.shape[:3]``. A contiguous ``dst`` takes one
    ``index_add_`` over its flattened rows (atomic adds, no sort); otherwise ``index_put_`` accumulates.
    """
    value = value.to(dst.dtype)
    if not dst.is_contiguous():
        dst.index_put_(index, value, accumulate=True)
        return
    b, r, h = torch.broadcast_tensors(*index)
    flat = (b * dst.shape[1] + r) * dst.shape[2] + h
    inner = dst.shape[3:]
    dst.view(-1, *inner).index_add_(0, flat.reshape(-1), value.reshape(-1, *inner))


@dataclass(frozen=True)
class RowBlock:
    """Local rows ``start + s * segment_stride + j * step`` for s < num_segments, j < length."""

    start: int
    num_segments: int
    length: int
    segment_stride: int
    step: int

    @property
    def is_strided(self) -> bool:
        """True when the rows are one arithmetic progression, so a slice (a view) reaches them."""
        return self.num_segments == 1 or self.segment_stride == self.length * self.step

    def split(self, max_segments: int) -> list[RowBlock]:
        """This block as consecutive blocks of at most ``max_segments`` segments each."""
        step = max(1, max_segments)
        return [
            RowBlock(self.start + s * self.segment_stride, min(step, self.num_segments - s), self.length,
                     self.segment_stride, self.step)
            for s in range(0, self.num_segments, step)
        ]  # fmt: skip

    def row_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The rows as a ``[num_segments, length]`` int64 tensor."""
        seg = torch.arange(self.num_segments, device=device) * self.segment_stride
        pos = torch.arange(self.length, device=device) * self.step
        return self.start + seg[:, None] + pos[None, :]


@lru_cache(maxsize=1024)
def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached int64 tensor of ``values`` on ``device``: steady-state steps make no host-to-device copy."""
    return torch.tensor(values, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Selection:
    """Rows of a :class:`RowBlock` and a set of heads of a ``[B, N, H, ...]`` tensor.

    ``heads`` is a ``slice`` (a view) or a tuple of indices (possibly repeated, for grouped-query keys).
    :meth:`gather` returns ``[B * num_segments, length, len(heads), ...]``; :meth:`put` and :meth:`add`
    write such a tensor back. Views are used wherever the layout allows one (no copy for r = 1).
    """

    rows: RowBlock
    heads: slice | tuple[int, ...]

    def num_heads(self, total: int) -> int:
        """How many heads the selection holds in a tensor of ``total`` heads."""
        return len(range(total)[self.heads]) if isinstance(self.heads, slice) else len(self.heads)

    def view(self, x: torch.Tensor) -> torch.Tensor | None:
        """:meth:`gather`'s result as a view of ``x`` (writes go through), or None if it needs a copy."""
        view = self._view(x)
        if view is None:
            return None
        try:  # B and segments merge into one dimension only when their strides line up
            return view.view(-1, *view.shape[2:])
        except RuntimeError:
            return None

    def _view(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, S, L, Hs, ...]`` view of ``x``, or None when the selection is not a strided view."""
        b = self.rows
        if not (b.is_strided and isinstance(self.heads, slice)):
            return None
        stop = b.start + (b.num_segments * b.length - 1) * b.step + 1
        return x[:, b.start : stop : b.step, self.heads].unflatten(1, (b.num_segments, b.length))

    def _index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows.row_index(x.device)[:, :, None]
        if isinstance(self.heads, slice):
            heads = torch.arange(x.shape[2], device=x.device)[self.heads]
        else:
            heads = index_tensor(self.heads, x.device)
        return rows, heads[None, None, :]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The selected rows and heads of ``x`` as a dense batch ``[B*S, L, Hs, ...]``."""
        view = self._view(x)
        if view is None:
            rows, heads = self._index(x)
            view = x[:, rows, heads]
        return view.flatten(0, 1)

    def _write(self, dst: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
        b = self.rows
        value = value.unflatten(0, (dst.shape[0], b.num_segments))
        view = self._view(dst)
        if view is not None:
            view.add_(value) if accumulate else view.copy_(value)
            return
        rows, heads = self._index(dst)
        index = (torch.arange(dst.shape[0], device=dst.device)[:, None, None, None], rows[None], heads[None])
        if accumulate:
            add_at(dst, index, value)
        else:
            dst.index_put_(index, value.to(dst.dtype))

    def put(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite the selected part of ``dst`` with ``value`` (the inverse of :meth:`gather`)."""
        self._write(dst, value, accumulate=False)

    def add(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``value`` into the selected part of ``dst``; repeated heads accumulate."""
        self._write(dst, value, accumulate=True)


@dataclass(frozen=True)
class AttentionTask:
    """One dense attention call: selected queries attend selected keys/values of one pattern."""

    pattern: int
    query: Selection
    key_value: Selection


def split_task(
    task: AttentionTask, batch: int, num_heads: int, head_dim: int, max_elements: int
) -> list[AttentionTask]:
    """``task`` cut along its segments so each call's query holds at most ``max_elements`` elements.

    A block of S segments becomes blocks of fewer segments (views stay views); one segment is never
    cut. Bounds the transient memory of a kernel call (its outputs and workspace) at long lengths.
    """
    rows = task.query.rows
    per_segment = batch * rows.length * task.query.num_heads(num_heads) * head_dim
    max_segments = max(1, max_elements // max(1, per_segment))
    if rows.num_segments <= max_segments or task.key_value.rows != rows:
        return [task]
    return [
        AttentionTask(task.pattern, Selection(part, task.query.heads), Selection(part, task.key_value.heads))
        for part in rows.split(max_segments)
    ]


def segment_row_blocks(
    segment_length: int, dilation: int, offset: int, position_offset: int, num_positions: int
) -> list[RowBlock]:
    """Row blocks of the local window that pattern (w, r) selects for head offset ``offset``.

    The window is global positions [position_offset, position_offset + num_positions). Segments that
    the window clips (the first, the last, a sequence shorter than w) become blocks of their own.
    """
    w, r, o, p0, n = segment_length, dilation, offset, position_offset, num_positions
    if n <= 0:
        return []
    end = p0 + n
    first_seg, last_seg = p0 // w, (end - 1) // w

    def clipped(seg: int) -> RowBlock | None:
        lo, hi = max(seg * w, p0), min((seg + 1) * w, end)
        # First selected p >= lo with (p - seg*w) % r == o.
        rel = lo - seg * w
        first = seg * w + rel + ((o - rel) % r)
        if first >= hi:
            return None
        length = (hi - 1 - first) // r + 1
        return RowBlock(first - p0, 1, length, w, r)

    interior = [s for s in range(first_seg, last_seg + 1) if s * w >= p0 and (s + 1) * w <= end]
    blocks: list[RowBlock] = []
    if first_seg not in interior:
        block = clipped(first_seg)
        if block is not None:
            blocks.append(block)
    if interior and o < w:
        length = (w - 1 - o) // r + 1
        blocks.append(RowBlock(interior[0] * w + o - p0, len(interior), length, w, r))
    if last_seg != first_seg and last_seg not in interior:
        block = clipped(last_seg)
        if block is not None:
            blocks.append(block)
    return blocks


def heads_for_offset(num_heads: int, dilation: int, offset: int, head_offset: int) -> slice | None:
    """Local query heads h whose global index (head_offset + h) has ``offset`` mod ``dilation``."""
    first = (offset - head_offset) % dilation
    return slice(first, num_heads, dilation) if first < num_heads else None


def kv_heads_for(query_heads: slice, num_heads: int, num_kv_heads: int) -> slice | tuple[int, ...]:
    """Key/value heads read by ``query_heads`` under grouped-query attention (head h reads h // g)."""
    group = num_heads // num_kv_heads
    if group == 1:
        return query_heads
    return tuple(h // group for h in range(num_heads)[query_heads])


def plan_tasks(
    config: DilatedAttentionConfig,
    num_positions: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    head_offset: int = 0,
    position_offset: int = 0,
) -> list[AttentionTask]:
    """Every dense attention call that the local window needs, pattern by pattern.

    Grouped-query attention needs the local head slice to start on a group boundary, which tensor
    parallelism guarantees (``head_offset`` = tp_rank * local heads, a multiple of the group size).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    if head_offset % group:
        raise ValueError(f"head_offset={head_offset} must be a multiple of the GQA group size {group}")
    if head_offset < 0 or position_offset < 0:
        raise ValueError(f"head_offset={head_offset} and position_offset={position_offset} must be >= 0")
    tasks = []
    for i, (w, r) in enumerate(config.patterns):
        for o in range(r):
            q_heads = heads_for_offset(num_heads, r, o, head_offset)
            if q_heads is None:
                continue
            kv_heads = kv_heads_for(q_heads, num_heads, num_kv_heads)
            for block in segment_row_blocks(w, r, o, position_offset, num_positions):
                tasks.append(AttentionTask(i, Selection(block, q_heads), Selection(block, kv_heads)))
    return tasks
