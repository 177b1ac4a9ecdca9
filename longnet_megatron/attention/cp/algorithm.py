"""LongNet's distributed dilated attention over a context-parallel group (docs/design.md section 4).

Each CP rank holds a contiguous chunk of the sequence. Forward, per layer:

1. post the messages: to every member of a crossing segment that reads them, this rank's selected k
   and v rows of that segment (all head offsets, distinct kv heads; :mod:`.plan`);
2. meanwhile run the single-rank path on the local chunk (``dilated_forward`` over ``plan_tasks``):
   every local query against every local key, all patterns, merged by log-sum-exp;
3. wait, then for each crossing segment and head offset, one non-causal call of the local queries
   against the keys received (all earlier in the sequence when causal), folded in with
   ``merge_partial``.

Backward mirrors it with the merged output and log-sum-exp (docs/design.md section 2): the remote calls'
backward runs first, their dk, dv are sent back to the ranks that own those keys while the local
``dilated_backward`` runs, and the owners add what they receive. Received keys are kept from the
forward pass (O(w/r) per pattern, not O(N)), so backward re-sends nothing but gradients.

Document masking (docs/design.md section 7): the local calls split by document like the single-rank
path; a remote call keeps only the queries and keys of the document that crosses the rank boundary
(:mod:`.documents`), found by global position.

Remote calls have as many keys as the sources hold, which is rarely the number of local queries.
They reach the backend as SQUARE calls only (:func:`_square_forward`), the one shape the single-rank
path uses and so the one every kernel is tested with; padding costs at most the remote calls' own
size, which is O(w/r) rows per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist

from ..backends import AttentionBackend, get_backend
from ..config import DilatedAttentionConfig
from ..documents import Documents
from ..function import dilated_backward, dilated_forward
from ..indexing import RowBlock, Selection, index_tensor
from ..merge import merge_partial
from .documents import DocumentSpan, RemoteCall, document_spans, remote_calls
from .exchange import PendingExchange, ensure_communicator, start_exchange
from .plan import ContextParallelPlan, CrossingSegment, OffsetExchange, plan_context_parallel


@dataclass
class CommStats:
    """Bytes this rank sent in one context-parallel attention call, by pattern index.

    ``forward_bytes[i]``: k and v rows of pattern i sent in the forward pass; ``backward_bytes[i]``:
    dk and dv sent back in the backward pass (filled when it runs). Patterns without crossing
    segments send nothing and do not appear.
    """

    forward_bytes: dict[int, int] = field(default_factory=dict)
    backward_bytes: dict[int, int] = field(default_factory=dict)


_LAST_STATS: CommStats | None = None


def last_comm_stats() -> CommStats | None:
    """Byte counts of this process's most recent call (its backward included once that has run)."""
    return _LAST_STATS


@lru_cache(maxsize=128)
def _cached_plan(
    config: DilatedAttentionConfig,
    n: int,
    hq: int,
    hkv: int,
    head_offset: int,
    position_offset: int,
    cp_rank: int,
    cp_size: int,
) -> ContextParallelPlan:
    return plan_context_parallel(
        config,
        n,
        hq,
        hkv,
        head_offset=head_offset,
        position_offset=position_offset,
        cp_rank=cp_rank,
        cp_size=cp_size,
    )


def _own_message(seg: CrossingSegment, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """This rank's selected k and v rows of ``seg``, flat, in the layout of :meth:`CrossingSegment.unpack`."""
    parts = []
    for off in seg.offsets:
        if off.key_value is not None:
            parts += [off.key_value.gather(k).reshape(-1), off.key_value.gather(v).reshape(-1)]
    return torch.cat(parts) if parts else k.new_empty((0,))


def _remote_keys(
    seg: CrossingSegment, received: dict[int, torch.Tensor], batch: int, head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per offset, the keys and values of all source members, heads expanded to the query heads."""
    per_source = [seg.unpack(received[m], m, batch, head_dim) for m in seg.sources]
    result: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for index, off in enumerate(seg.offsets):
        pieces = [views[index] for views in per_source]
        if off.query is None or not sum(k.shape[1] for k, _ in pieces):
            result.append(None)
            continue
        k, v = (torch.cat([p[j] for p in pieces], dim=1) for j in (0, 1))
        if off.expand is not None:
            k, v = (
                k.index_select(2, index_tensor(off.expand, k.device)),
                v.index_select(2, index_tensor(off.expand, k.device)),
            )
        result.append((k, v))
    return result


def _fold_heads(grad: torch.Tensor, off: OffsetExchange) -> torch.Tensor:
    """Sum a key gradient over query heads that share a kv head (inverse of the expansion)."""
    if off.expand is None:
        return grad
    out = grad.new_zeros((*grad.shape[:2], off.kv_heads, grad.shape[3]))
    return out.index_add_(2, index_tensor(off.expand, grad.device), grad)


def _query_part(sel: Selection, call: RemoteCall) -> Selection:
    """The rows ``call.queries`` of a one-segment query selection."""
    block = sel.rows
    start, stop, _ = call.queries.indices(block.length)
    part = RowBlock(block.start + start * block.step, 1, stop - start, block.segment_stride, block.step)
    return Selection(part, sel.heads)


def _merge_remote(
    out: torch.Tensor, lse: torch.Tensor, sel: Selection, o_r: torch.Tensor, l_r: torch.Tensor
) -> None:
    """``merge_partial`` of one remote call, in the log-sum-exp's precision on the selected rows only.

    ``dilated_forward`` returns the output in q's dtype; folding the remote keys in on a float32 copy
    of just these rows rounds once (like the single-rank path) without a full-size float32 buffer.
    """
    acc_out, acc_lse = sel.gather(out).to(lse.dtype), sel.gather(lse)
    rows = acc_out.shape[1]
    merge_partial(acc_out, acc_lse, Selection(RowBlock(0, 1, rows, rows, 1), slice(None)), o_r, l_r)
    sel.put(out, acc_out)
    sel.put(lse, acc_lse)


# Log-sum-exp given to padded query rows in backward: exp(S - L) is 0 there, with no inf arithmetic.
_PAD_LSE = 1e30


def _pad_rows(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """``x`` (rows on dim 1, or dim 2 for a ``[b, h, l]`` log-sum-exp) padded to ``length`` rows."""
    dim = 2 if x.dim() == 3 else 1
    missing = length - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _row_chunks(lq: int, lk: int) -> list[slice]:
    """Query rows in chunks of ``lk``, each padded to a square call (one chunk when lk >= lq)."""
    return [slice(start, min(start + lk, lq)) for start in range(0, lq, lk)]


def _square_forward(
    backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of q ``[b, lq]`` over k, v ``[b, lk]`` through square backend calls.

    Zero query rows pad a chunk to lk rows; their outputs are dropped and, in backward, their zero
    output gradient contributes nothing to dk, dv.
    """
    lq, lk = q.shape[1], k.shape[1]
    if lq == lk:
        return backend.forward(q, k, v, causal=False, scale=scale)
    outs, lses = [], []
    for rows in _row_chunks(lq, lk):
        o, lse = backend.forward(_pad_rows(q[:, rows], lk), k, v, causal=False, scale=scale)
        count = rows.stop - rows.start
        outs.append(o[:, :count])
        lses.append(lse[:, :, :count])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _square_backward(
    backend: AttentionBackend,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`_square_forward` given the merged ``out`` and ``lse`` (``[b, h, lq]``)."""
    lq, lk = q.shape[1], k.shape[1]
    if lq == lk:
        return backend.backward(dout, q, k, v, out, lse, causal=False, scale=scale)
    dqs, dk, dv = [], None, None
    for rows in _row_chunks(lq, lk):
        padded = [_pad_rows(t[:, rows], lk) for t in (dout, q, out)]
        lse_c = _pad_rows(lse[:, :, rows], lk, _PAD_LSE)
        dq_c, dk_c, dv_c = backend.backward(
            padded[0], padded[1], k, v, padded[2], lse_c, causal=False, scale=scale
        )
        dqs.append(dq_c[:, : rows.stop - rows.start])
        dk, dv = (dk_c, dv_c) if dk is None else (dk + dk_c, dv + dv_c)
    return torch.cat(dqs, dim=1), dk, dv


def _tag(seg: CrossingSegment) -> int:
    """Message tag: a pair of ranks shares at most one segment per pattern, so the pattern tells them apart."""
    return seg.pattern


def _count(table: dict[int, int], seg: CrossingSegment, tensor: torch.Tensor, copies: int = 1) -> None:
    if tensor.numel() and copies:
        table[seg.pattern] = table.get(seg.pattern, 0) + copies * tensor.nbytes


def _received_by_segment(
    plan: ContextParallelPlan, buffers: list[torch.Tensor]
) -> list[dict[int, torch.Tensor]]:
    """Split the flat list of received messages back into ``{source member: message}`` per segment."""
    result, cursor = [], 0
    for seg in plan.crossing:
        result.append(dict(zip(seg.sources, buffers[cursor : cursor + len(seg.sources)])))
        cursor += len(seg.sources)
    return result


def _send_keys(
    plan: ContextParallelPlan, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, stats: CommStats
) -> PendingExchange:
    """Post this rank's selected keys to their readers and the receives of its sources' keys."""
    batch, head_dim = k.shape[0], k.shape[3]
    sends, receives = [], []
    for seg in plan.crossing:
        own = _own_message(seg, k, v)
        sends += [(m, own, _tag(seg)) for m in seg.targets]
        _count(stats.forward_bytes, seg, own, len(seg.targets))
        receives += [
            (m, k.new_empty((seg.message_numel(m, batch, head_dim),)), _tag(seg)) for m in seg.sources
        ]
    return start_exchange(sends, receives, group)


def _remote_forward(
    plan: ContextParallelPlan,
    received: list[dict[int, torch.Tensor]],
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    backend: AttentionBackend,
    scale: float,
    spans: tuple[DocumentSpan, ...] | None,
) -> None:
    """Fold the local queries' attention over the received keys into (out, lse)."""
    batch, n, head_dim = q.shape[0], q.shape[1], q.shape[3]
    chunk = (plan.position_offset, plan.position_offset + n)
    for seg, messages in zip(plan.crossing, received):
        for off, kv in zip(seg.offsets, _remote_keys(seg, messages, batch, head_dim)):
            if kv is None:
                continue
            for call in remote_calls(seg, off, plan.rank, chunk, spans):
                sel = _query_part(off.query, call)
                keys = [t[call.batch, call.keys] for t in kv]
                o_r, l_r = _square_forward(backend, sel.gather(q[call.batch]), *keys, scale)
                _merge_remote(out[call.batch], lse[call.batch], sel, o_r, l_r)


def _remote_backward(
    plan: ContextParallelPlan,
    received: list[dict[int, torch.Tensor]],
    tensors: tuple[torch.Tensor, ...],
    backend: AttentionBackend,
    scale: float,
    stats: CommStats,
    spans: tuple[DocumentSpan, ...] | None,
) -> tuple[list, list[tuple[int, torch.Tensor, int]]]:
    """Backward of the remote calls: (selection, batch, dq) parts and the dk, dv messages to the key owners."""
    dout, q, out, lse = tensors
    batch, n, head_dim = q.shape[0], q.shape[1], q.shape[3]
    chunk = (plan.position_offset, plan.position_offset + n)
    dq_parts, returns = [], []
    for seg, messages in zip(plan.crossing, received):
        grads = {m: torch.zeros_like(messages[m]) for m in seg.sources}
        views = {m: seg.unpack(grads[m], m, batch, head_dim) for m in seg.sources}
        for index, (off, kv) in enumerate(zip(seg.offsets, _remote_keys(seg, messages, batch, head_dim))):
            if kv is None:
                continue
            dk_r, dv_r = torch.zeros_like(kv[0]), torch.zeros_like(kv[1])
            for call in remote_calls(seg, off, plan.rank, chunk, spans):
                sel = _query_part(off.query, call)
                rows = [sel.gather(t[call.batch]) for t in (dout, q, out)]
                dq_c, dk_c, dv_c = _square_backward(
                    backend,
                    rows[0],
                    rows[1],
                    *(t[call.batch, call.keys] for t in kv),
                    rows[2],
                    sel.gather(lse[call.batch]).transpose(1, 2),
                    scale,
                )
                dq_parts.append((sel, call.batch, dq_c))
                dk_r[call.batch, call.keys] += dk_c
                dv_r[call.batch, call.keys] += dv_c
            dk_r, dv_r = _fold_heads(dk_r, off), _fold_heads(dv_r, off)
            start = 0
            for m in seg.sources:  # the keys were concatenated in source order
                dk_m, dv_m = views[m][index]
                dk_m.copy_(dk_r[:, start : start + dk_m.shape[1]])
                dv_m.copy_(dv_r[:, start : start + dv_m.shape[1]])
                start += dk_m.shape[1]
        returns += [(m, grads[m], _tag(seg)) for m in seg.sources]
        for m in seg.sources:
            _count(stats.backward_bytes, seg, grads[m])
    return dq_parts, returns


class ContextParallelDilatedAttention(torch.autograd.Function):
    """One autograd node for the whole distributed layer; saves q, k, v, O, L and the received keys."""

    @staticmethod
    def forward(ctx, q, k, v, plan, backend, group, causal, scale, documents=None):  # noqa: D102
        global _LAST_STATS
        ensure_communicator(group, q.device)
        spans = None if documents is None else document_spans(documents, group, plan.position_offset)
        stats = CommStats()
        pending = _send_keys(plan, k, v, group, stats)

        # Local patterns and local parts of crossing segments compute while the keys travel.
        out, lse = dilated_forward(
            q, k, v, plan.tasks, backend, causal=causal, scale=scale, documents=documents
        )

        buffers = pending.wait()
        _remote_forward(plan, _received_by_segment(plan, buffers), q, out, lse, backend, scale, spans)
        ctx.save_for_backward(q, k, v, out, lse, *buffers)
        ctx.plan, ctx.backend, ctx.group, ctx.stats = plan, backend, group, stats
        ctx.causal, ctx.scale, ctx.documents, ctx.spans = causal, scale, documents, spans
        ctx.mark_non_differentiable(lse)
        _LAST_STATS = stats
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse, *buffers = ctx.saved_tensors
        plan, backend, scale = ctx.plan, ctx.backend, ctx.scale
        batch, head_dim = q.shape[0], q.shape[3]
        dout = dout.to(q.dtype)

        # Remote calls first, so their key gradients travel while the local backward computes.
        received = _received_by_segment(plan, buffers)
        dq_parts, returns = _remote_backward(
            plan, received, (dout, q, out, lse), backend, scale, ctx.stats, ctx.spans
        )
        receives = [
            (m, k.new_empty((seg.message_numel(plan.rank, batch, head_dim),)), _tag(seg))
            for seg in plan.crossing
            for m in seg.targets
        ]
        pending = start_exchange(returns, receives, ctx.group)

        dq, dk, dv = dilated_backward(
            dout, q, k, v, out, lse, plan.tasks, backend, causal=ctx.causal, scale=scale,
            documents=ctx.documents,
        )  # fmt: skip
        for sel, rows, dq_r in dq_parts:
            sel.add(dq[rows], dq_r)

        grads = iter(pending.wait())
        for seg in plan.crossing:
            for _ in seg.targets:
                views = seg.unpack(next(grads), plan.rank, batch, head_dim)
                for off, (dk_m, dv_m) in zip(seg.offsets, views):
                    if off.key_value is not None:
                        off.key_value.add(dk, dk_m)
                        off.key_value.add(dv, dv_m)
        return dq, dk, dv, None, None, None, None, None, None


def context_parallel_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: DilatedAttentionConfig,
    *,
    cp_group: dist.ProcessGroup,
    head_offset: int = 0,
    position_offset: int = 0,
    backend: str | AttentionBackend = "auto",
    documents: Documents | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dilated attention of a sequence split contiguously over ``cp_group``.

    q ``[B, n, Hq, D]``, k and v ``[B, n, Hkv, D]`` are this rank's chunk: global positions
    ``[position_offset, position_offset + n)`` with ``position_offset = cp_rank * n`` (plus a base
    common to the group); every rank holds the same n. ``head_offset`` is the global index of local
    head 0 (tensor parallelism). Returns this chunk's output ``[B, n, Hq, D]`` and float32 log-sum-exp
    ``[B, n, Hq]``, equal to the single-rank result on the whole sequence; differentiable in q, k, v.
    ``documents``: this chunk's document ids (their runs continue across rank boundaries where the
    ids there are equal). Called by :func:`longnet_megatron.attention.dilated_attention` when
    ``cp_group`` has several ranks.
    """
    impl = get_backend(backend, q, documents=documents is not None)
    plan = _cached_plan(
        config,
        q.shape[1],
        q.shape[2],
        k.shape[2],
        head_offset,
        position_offset,
        dist.get_rank(cp_group),
        dist.get_world_size(cp_group),
    )
    scale = config.scale_for(q.shape[-1])
    return ContextParallelDilatedAttention.apply(
        q, k, v, plan, impl, cp_group, config.causal, scale, documents
    )
