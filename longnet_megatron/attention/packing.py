"""Kernel calls from a plan: large tasks cut to a bounded size, small tasks packed together.

A plan has one task per (pattern, head offset, block), so a pattern of dilation r makes r calls; at
short lengths those calls are small and their launch costs dominate (the host, not the GPU, sets the
pace: benchmarks/attention.md). Small tasks whose blocks have the same segment length are stacked along
the batch dimension into one call (a gather by index), whatever their pattern: with the usual
w_i / r_i = 2048 every pattern's segments have one length, so one call serves them all. Tasks with
different head counts are stacked one head per sequence. A call holding several patterns holds a
(position, head) once per pattern; its results are merged part by part (:attr:`PackedTask.parts`),
each part one pattern's rows, which never repeat. Large tasks keep their own call and their views;
when the whole plan is small (short sequences), every task counts as small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .indexing import AttentionTask, Selection, index_tensor, split_task

# Tasks with fewer query elements than this are packed (2^22: 8 MiB in bf16, e.g. 16K rows x 2 heads x
# 128). Measured on an H200 at N = 128K (benchmarks/attention.md): 2^22 against 2^23 keeps the r = 8
# calls on views, 6% faster fwd+bwd; the gathers and index-adds of a packed call cost more than its
# saved launches once the GPU, not the host, sets the pace.
PACK_BELOW = 1 << 22
# A plan whose tasks hold fewer query elements than this in all is packed whole (2^25: N = 8K with 16
# heads of 128 and the geometric patterns), where the host's launches set the pace: 6% faster at 8K,
# but 10-25% slower at 16K, where the first pattern's copies outweigh the launches saved.
PACK_PLAN_BELOW = 1 << 25


@contextlib.contextmanager
def whole_plan_packing(enabled: bool) -> Iterator[None]:
    """Within the block, short plans are packed whole (:data:`PACK_PLAN_BELOW`) or not at all.

    Packing a whole plan saves launches at the cost of gathers and index-adds; replayed from CUDA
    graphs (:mod:`.graphs`), launches cost nothing, so graph capture can turn it off.
    """
    global PACK_PLAN_BELOW
    saved = PACK_PLAN_BELOW
    if not enabled:
        PACK_PLAN_BELOW = 0
    try:
        yield
    finally:
        PACK_PLAN_BELOW = saved


# PackedTask.pattern of a call that holds several patterns (see PackedTask.parts).
MIXED = -1


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
              device: torch.device, heads_as_batch: bool = False) -> PackedSelection:  # fmt: skip
        """The selections of ``[batch, num_positions, num_heads, ...]`` tensors, one after another.

        ``heads_as_batch``: every (sequence, head) becomes a sequence of its own, ``[M * Hs, L, 1]``,
        so selections with different head counts stack.
        """
        parts = []
        for sel in selections:
            rows = sel.rows.row_index(device)  # [S, L]
            heads = torch.arange(num_heads, device=device)[sel.heads] if isinstance(sel.heads, slice) else (
                index_tensor(sel.heads, device))  # fmt: skip
            b = torch.arange(batch, device=device)[:, None, None, None]
            flat = (b * num_positions + rows[None, :, :, None]) * num_heads + heads  # [B, S, L, Hs]
            if heads_as_batch:
                flat = flat.permute(0, 1, 3, 2).reshape(-1, flat.shape[2], 1)
            parts.append(flat.flatten(0, 1) if flat.dim() == 4 else flat)
        flat = torch.cat(parts)
        return cls(flat.reshape(-1), tuple(flat.shape), num_heads)

    def sequences(self, start: int, count: int) -> PackedSelection:
        """Sequences ``[start, start + count)`` of this selection (a part of its batch)."""
        flat = self.flat.view(self.shape)[start : start + count]
        return PackedSelection(flat.reshape(-1), (count, *self.shape[1:]), self.num_heads)

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
    """One kernel call made of several tasks, of one pattern or (``pattern`` = :data:`MIXED`) several.

    ``parts``: (pattern, number of sequences) of the call's batch, in order; within a part no
    (position, head) repeats, across parts it may (one per pattern).
    """

    pattern: int
    query: PackedSelection
    key_value: PackedSelection
    parts: tuple[tuple[int, int], ...] = ()

    def split_parts(self) -> list[tuple[int, int, int]]:
        """(pattern, first sequence, number of sequences) of each part."""
        out, start = [], 0
        for pattern, count in self.parts or ((self.pattern, self.query.shape[0]),):
            out.append((pattern, start, count))
            start += count
        return out


def _query_elements(task: AttentionTask, batch: int, num_heads: int, head_dim: int) -> int:
    rows = task.query.rows
    return batch * rows.num_segments * rows.length * task.query.num_heads(num_heads) * head_dim


def kernel_calls(
    tasks: Sequence[AttentionTask],
    shape: tuple[int, int, int, int],
    kv_heads: int,
    device: torch.device,
    max_elements: int,
    pack_below: int | None = None,
) -> list[AttentionTask | PackedTask]:
    """The calls for ``tasks`` on q of ``shape`` ``[B, N, H, D]``: large tasks first, in plan order.

    Each call's query holds at most ``max_elements`` elements: larger tasks are cut along segments;
    tasks under ``pack_below`` (default :data:`PACK_BELOW`; 0 packs nothing) elements, or every task
    when the plan holds under :data:`PACK_PLAN_BELOW`, are packed by segment length, across patterns.
    """
    pack_below = PACK_BELOW if pack_below is None else pack_below
    b, n, h, d = shape
    parts = [part for t in tasks for part in split_task(t, b, h, d, max_elements)]
    if pack_below > 0 and sum(_query_elements(t, b, h, d) for t in parts) < PACK_PLAN_BELOW:
        pack_below = max_elements + 1
    calls: list[AttentionTask | PackedTask] = []
    groups: dict[int, list[AttentionTask]] = {}
    sizes: dict[int, int] = {}

    def flush(length: int) -> None:
        group = groups.pop(length)
        sizes.pop(length)
        if len(group) == 1:
            calls.append(group[0])
            return
        head_counts = {t.query.num_heads(h) for t in group}
        by_head = len(head_counts) > 1
        query = PackedSelection.stack([t.query for t in group], b, n, h, device, heads_as_batch=by_head)
        key_value = PackedSelection.stack(
            [t.key_value for t in group], b, n, kv_heads, device, heads_as_batch=by_head
        )
        runs: list[tuple[int, int]] = []
        for t in group:
            count = b * t.query.rows.num_segments * (t.query.num_heads(h) if by_head else 1)
            if runs and runs[-1][0] == t.pattern:
                runs[-1] = (t.pattern, runs[-1][1] + count)
            else:
                runs.append((t.pattern, count))
        pattern = runs[0][0] if len(runs) == 1 else MIXED
        calls.append(PackedTask(pattern, query, key_value, tuple(runs)))

    for task in parts:
        rows = task.query.rows
        size = _query_elements(task, b, h, d)
        if size >= pack_below or task.key_value.rows != rows:
            calls.append(task)
            continue
        if rows.length in groups and sizes[rows.length] + size > max_elements:
            flush(rows.length)
        groups.setdefault(rows.length, []).append(task)
        sizes[rows.length] = sizes.get(rows.length, 0) + size
    for length in list(groups):
        flush(length)
    return calls
