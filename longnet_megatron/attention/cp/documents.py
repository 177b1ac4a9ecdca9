"""Document masking under context parallelism: which received keys each local query may see.

Documents cross rank boundaries (a run of equal ids continues on the next rank when the ids at the
boundary are equal). Local calls need only the local runs (:mod:`..documents`). Received keys all lie
outside this rank's chunk, so only the document holding the chunk's first token can reach keys of
earlier ranks, and only the one holding its last token keys of later ranks: each is a contiguous
range of the received keys and of the local selected queries. One small all-gather per batch (its
result cached on the :class:`~..documents.Documents`) tells every rank where those two documents
begin and end globally; the key and query ranges then follow from arithmetic on the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..documents import Documents
from .plan import CrossingSegment, OffsetExchange


@dataclass(frozen=True)
class DocumentSpan:
    """Global ``[start, end)`` of the documents holding this chunk's first and last tokens (one batch item)."""

    first_start: int
    first_end: int
    last_start: int
    last_end: int


@dataclass(frozen=True)
class RemoteCall:
    """Queries ``queries`` of an offset's local selection x received keys ``keys``, batch items ``batch``."""

    batch: slice
    queries: slice
    keys: slice


def _edges(ids: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` int64: first id, last id, first and last local position where a new run starts
    (n and 0 when the chunk is one run)."""
    b, n = ids.shape
    change = ids[:, 1:] != ids[:, :-1]
    pos = torch.arange(1, n, device=ids.device).expand(b, n - 1)
    first = torch.where(change, pos, torch.full_like(pos, n)).amin(1) if n > 1 else ids.new_full((b,), n)
    last = torch.where(change, pos, torch.zeros_like(pos)).amax(1) if n > 1 else ids.new_zeros((b,))
    return torch.stack([ids[:, 0].long(), ids[:, -1].long(), first.long(), last.long()], 1)


def document_spans(
    documents: Documents, group: dist.ProcessGroup, position_offset: int
) -> tuple[DocumentSpan, ...]:
    """Per batch item, the global spans of this rank's edge documents (one all-gather, cached)."""
    return documents.cached(
        ("cp_spans", id(group), position_offset), group, lambda: _spans(documents, group, position_offset)
    )


def _spans(documents: Documents, group: dist.ProcessGroup, position_offset: int) -> tuple[DocumentSpan, ...]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    n = documents.ids.shape[1]
    edges = _edges(documents.ids)
    gathered = [torch.empty_like(edges) for _ in range(size)]
    dist.all_gather(gathered, edges, group=group)
    table = torch.stack(gathered).cpu().tolist()  # [rank][batch][first id, last id, first, last]
    base = position_offset - rank * n
    return tuple(_span([table[c][b] for c in range(size)], rank, n, base) for b in range(edges.shape[0]))


def _span(edges: list[list[int]], rank: int, n: int, base: int) -> DocumentSpan:
    """The span of ``rank``'s edge documents from every rank's :func:`_edges` row of one batch item."""
    e, size = edges, len(edges)

    def starts_run(c: int) -> bool:  # does chunk c's first token start a new document?
        return c == 0 or e[c - 1][1] != e[c][0]

    c = rank  # the first document: back to the last run start at or before this chunk's start
    while not starts_run(c) and e[c - 1][3] == 0:
        c -= 1
    first_start = base + c * n if starts_run(c) else base + (c - 1) * n + e[c - 1][3]
    c = rank  # the last document: on to the first run start after this chunk's end
    while c + 1 < size and e[c][1] == e[c + 1][0] and e[c + 1][2] == n:
        c += 1
    continues = c + 1 < size and e[c][1] == e[c + 1][0]
    last_end = base + (c + 1) * n + (e[c + 1][2] if continues else 0)
    mine = e[rank]
    first_end = base + rank * n + mine[2] if mine[2] < n else last_end
    last_start = base + rank * n + mine[3] if mine[3] > 0 else first_start
    return DocumentSpan(first_start, first_end, last_start, last_end)


def _count_below(first: int, length: int, step: int, bound: int) -> int:
    """How many of the positions ``first + step * i`` (i < length) lie below ``bound``."""
    if length <= 0:
        return 0
    return min(length, max(0, -(-(bound - first) // step)))


def remote_calls(
    seg: CrossingSegment,
    off: OffsetExchange,
    rank: int,
    chunk: tuple[int, int],
    spans: tuple[DocumentSpan, ...] | None,
) -> list[RemoteCall]:
    """The calls of one offset of a crossing segment: all queries x all keys without documents; with
    them, per batch item, the first document's queries x its keys on earlier ranks and the last
    document's queries x its keys on later ranks. ``chunk``: this rank's global ``[start, end)``."""
    counts = {m: off.rows[seg.members.index(m)] for m in seg.sources}
    firsts = {m: off.firsts[seg.members.index(m)] for m in seg.sources}
    lq = off.query.rows.length
    if spans is None:
        return [RemoteCall(slice(None), slice(0, lq), slice(0, sum(counts.values())))]
    step = off.step
    q_first = chunk[0] + off.query.rows.start
    earlier = [m for m in seg.sources if m < rank]
    later = [m for m in seg.sources if m > rank]
    n_earlier = sum(counts[m] for m in earlier)
    calls = []
    for b, span in enumerate(spans):
        batch = slice(b, b + 1)
        if earlier and span.first_start < chunk[0]:
            seen = sum(
                counts[m] - _count_below(firsts[m], counts[m], step, span.first_start) for m in earlier
            )
            queries = _count_below(q_first, lq, step, span.first_end)
            if seen and queries:
                calls.append(RemoteCall(batch, slice(0, queries), slice(n_earlier - seen, n_earlier)))
        if later and span.last_end > chunk[1]:
            seen = sum(_count_below(firsts[m], counts[m], step, span.last_end) for m in later)
            first_query = _count_below(q_first, lq, step, span.last_start)
            if seen and first_query < lq:
                calls.append(RemoteCall(batch, slice(first_query, lq), slice(n_earlier, n_earlier + seen)))
    return calls
