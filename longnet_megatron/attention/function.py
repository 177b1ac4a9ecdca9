"""Exact dilated attention over any backend: per-pattern calls, the log-sum-exp merge, the exact backward.

Forward (docs/design.md section 1): every task (one pattern, one head offset, one block of equal-length
segments) is a dense attention call returning (O_i, L_i), small tasks packed into shared calls, across
patterns where their segment lengths agree (:mod:`.packing`). Where every w is a multiple of its r
(the usual geometric patterns) and there are no documents, each call writes into its pattern's compact
buffer and one pass merges them at the end (:mod:`.deferred`). Otherwise results are merged online,
L = logaddexp(L, L_i), O = O + (O_i - O) * exp(L_i - L), into one accumulator (:mod:`.merge`, one fused
kernel per call on CUDA; a call of several patterns part by part), so no per-pattern full-size buffer
exists. When the first pattern covers every (position, head) (r = 1) in calls of its own that come
first, its results are written straight into the accumulator instead of merged.

Backward (docs/design.md section 2): each task's kernel backward runs on the gathered q, k, v with the
MERGED O and L, and its dq, dk, dv are scatter-added (one fused kernel per call on CUDA,
:mod:`.grad_add`; the first pattern's written, by backends with ``backward_into`` straight into views
of the gradients). With P_i = exp(S_i - L) these are exactly the
gradients of the merged attention; nothing is differentiated through the merge weights.

Document masking (docs/design.md section 7): with :class:`~.documents.Documents`, each call whose
segments hold a document boundary runs as a variable-length batch over the documents' runs (or is
split into dense runs of whole-document segments and one variable-length call); the merge and the
backward are the same, since every call still returns (O_i, L_i) of its rows.

Memory (1M tokens must fit one 80 GB GPU): selections are views wherever the layout allows (r = 1, and
w a multiple of r), gathered copies are dropped as soon as the kernel has read them, calls are cut so
that one call's query holds at most ``MAX_CALL_ELEMENTS`` elements (bounding kernel outputs and
workspace), the forward keeps per-pattern buffers in q's dtype (deferred merge; together smaller than
one float32 accumulator of the output, which the online merge keeps), and half-precision gradients are
accumulated in their own dtype (each add computed in float32 and rounded once) rather than in three
float32 buffers the size of q, k and v.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from . import deferred, packing
from .backends.base import AttentionBackend
from .deferred import DeferredLayout, DeferredMerge, deferred_layout
from .documents import Documents, Varlen, attend, attend_backward
from .grad_add import add_call_grads
from .indexing import AttentionTask, Selection
from .merge import merge_partial
from .packing import MIXED, PackedSelection, PackedTask, kernel_calls

Call = AttentionTask | PackedTask

# Largest query (elements) of one kernel call: 2^27 is 256 MiB in bf16, 2^15 segments x heads of 2048 x 128.
MAX_CALL_ELEMENTS = 1 << 27


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradient accumulators: float32/64 stay, half precision accumulates in its own dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else _accumulator_dtype(dtype)


# Recent kernel-call lists, by the identity of the task sequence (kept alive here, so ids stay unique).
_CALLS: dict[tuple, tuple[Sequence[AttentionTask], list[AttentionTask | PackedTask]]] = {}
_CALLS_KEPT = 32


def _calls(
    tasks: Sequence[AttentionTask], q: torch.Tensor, k: torch.Tensor, max_elements: int
) -> list[AttentionTask | PackedTask]:
    """:func:`~.packing.kernel_calls` of ``tasks``, remembered for the next step with the same plan."""
    key = (id(tasks), tuple(q.shape), k.shape[2], q.device, max_elements, packing.PACK_BELOW,
           packing.PACK_PLAN_BELOW)  # fmt: skip
    hit = _CALLS.get(key)
    if hit is not None and hit[0] is tasks:
        return hit[1]
    calls = kernel_calls(tasks, tuple(q.shape), k.shape[2], q.device, max_elements)
    if len(_CALLS) >= _CALLS_KEPT:
        _CALLS.pop(next(iter(_CALLS)))
    _CALLS[key] = (tasks, calls)
    return calls


# Deferred-merge layouts (:mod:`.deferred`), by the identity of the task sequence, as for _CALLS.
_LAYOUTS: dict[tuple, tuple[Sequence[AttentionTask], DeferredLayout | None]] = {}


def _layout(tasks: Sequence[AttentionTask], q: torch.Tensor) -> DeferredLayout | None:
    """:func:`~.deferred.deferred_layout` of ``tasks`` on ``q``, remembered like the kernel calls."""
    key = (id(tasks), tuple(q.shape))
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] is tasks:
        return hit[1]
    layout = deferred_layout(tasks, tuple(q.shape))
    if len(_LAYOUTS) >= _CALLS_KEPT:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[key] = (tasks, layout)
    return layout


def _document_calls(
    tasks: Sequence[AttentionTask],
    q: torch.Tensor,
    k: torch.Tensor,
    max_elements: int,
    backend: AttentionBackend,
    documents: Documents | None,
) -> list[tuple[AttentionTask | PackedTask, Varlen | None]]:
    """The kernel calls of ``tasks``, split by document when ``documents`` are given (None: dense)."""
    calls = _calls(tasks, q, k, max_elements)
    if documents is None:
        return [(call, None) for call in calls]
    return documents.calls(calls, q, k.shape[2], backend)


def _first_pattern_covers_all(tasks: Sequence[AttentionTask], q: torch.Tensor) -> bool:
    """True if the first pattern's tasks lead the list and cover every (position, head).

    Tasks of one pattern are disjoint, so their results can then be written instead of merged.
    """
    if not tasks:
        return False
    n, h = q.shape[1:3]
    first = tasks[0].pattern
    lead = next((i for i, t in enumerate(tasks) if t.pattern != first), len(tasks))
    if any(t.pattern == first for t in tasks[lead:]):
        return False
    covered = sum(
        t.query.rows.num_segments * t.query.rows.length * t.query.num_heads(h) for t in tasks[:lead]
    )
    return covered == n * h


def _writes_first(tasks: Sequence[AttentionTask], calls: Sequence[tuple[Call, Varlen | None]],
                  q: torch.Tensor) -> bool:  # fmt: skip
    """True if the first pattern's calls may write their results: it covers every (position, head),
    its calls hold it alone and come before every call of another pattern."""
    if not _first_pattern_covers_all(tasks, q):
        return False
    first, other_seen = tasks[0].pattern, False
    for call, _ in calls:
        if call.pattern == first:
            if other_seen:
                return False
        elif call.pattern == MIXED and any(p == first for p, _ in call.parts):
            return False
        else:
            other_seen = True
    return True


def _parts(
    call: Call, o_i: torch.Tensor, l_i: torch.Tensor
) -> Iterator[tuple[Selection | PackedSelection, torch.Tensor, torch.Tensor]]:
    """(selection, O_i, L_i) of each part of a call whose rows do not repeat (one pattern each)."""
    if call.pattern != MIXED:
        yield call.query, o_i, l_i
        return
    for _, start, count in call.split_parts():
        end = start + count
        yield call.query.sequences(start, count), o_i[start:end], l_i[start:end]


def dilated_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tasks: Sequence[AttentionTask],
    backend: AttentionBackend,
    *,
    causal: bool,
    scale: float,
    max_call_elements: int = MAX_CALL_ELEMENTS,
    documents: Documents | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``[B, N, Hq, D]`` (q's dtype) and log-sum-exp ``[B, N, Hq]`` (float32/64)."""
    calls = _document_calls(tasks, q, k, max_call_elements, backend, documents)
    layout = _layout(tasks, q) if deferred.ENABLED and documents is None else None
    if layout is not None:
        return _forward_deferred(q, k, v, calls, layout, backend, causal=causal, scale=scale)
    direct = _writes_first(tasks, calls, q)
    if direct:
        acc = _accumulator_dtype(q.dtype)
        out = torch.empty(q.shape, dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    else:
        out, lse = new_accumulators(q)
    first = tasks[0].pattern if tasks else None
    for task, varlen in calls:
        sel, kv = task.query, task.key_value
        o_i, l_i = attend(
            backend, sel.gather(q), kv.gather(k), kv.gather(v), varlen, causal=causal, scale=scale
        )
        if direct and task.pattern == first:
            sel.put(out, o_i)
            sel.put(lse, l_i.transpose(1, 2))
        else:
            for part, o_p, l_p in _parts(task, o_i, l_i):
                merge_partial(out, lse, part, o_p, l_p)
        del o_i, l_i
    return out.to(q.dtype), lse


def _forward_deferred(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    calls: Sequence[tuple[Call, Varlen | None]],
    layout: DeferredLayout,
    backend: AttentionBackend,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dilated_forward` with the merge deferred (:mod:`.deferred`): every call writes its
    results into its pattern's buffer (in place where the backend has ``forward_into``), one pass
    merges them."""
    state = DeferredMerge(layout, q, _accumulator_dtype(q.dtype))
    into = getattr(backend, "forward_into", None)
    for call, _ in calls:
        sel, kv = call.query, call.key_value
        q_i, k_i, v_i = sel.gather(q), kv.gather(k), kv.gather(v)
        targets = state.targets(call) if into is not None else None
        if targets is not None:
            into(q_i, k_i, v_i, *targets, causal=causal, scale=scale)
        else:
            o_i, l_i = backend.forward(q_i, k_i, v_i, causal=causal, scale=scale)
            state.write(call, o_i, l_i)
            del o_i, l_i
        del q_i, k_i, v_i
    return state.finish()


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty merge state for q: output zeros ``[B, N, H, D]`` and log-sum-exp -inf ``[B, N, H]``."""
    acc = _accumulator_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    return out, lse


def dilated_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tasks: Sequence[AttentionTask],
    backend: AttentionBackend,
    *,
    causal: bool,
    scale: float,
    max_call_elements: int = MAX_CALL_ELEMENTS,
    documents: Documents | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (dq, dk, dv) of the merged attention, given its output and log-sum-exp."""
    # The first pattern's gradients are written, not added, when it covers every (position, head) and
    # no key/value head is shared (GQA sums several query heads into one).
    calls = _document_calls(tasks, q, k, max_call_elements, backend, documents)
    direct = _writes_first(tasks, calls, q) and k.shape[2] == q.shape[2]
    first = tasks[0].pattern if tasks else None
    acc = _grad_dtype(q.dtype)
    alloc = torch.empty if direct else torch.zeros
    dq = alloc(q.shape, dtype=acc, device=q.device)
    dk = alloc(k.shape, dtype=acc, device=k.device)
    dv = alloc(v.shape, dtype=acc, device=v.device)
    dout = dout.to(q.dtype)
    for task, varlen in calls:
        sel, kv = task.query, task.key_value
        write = direct and task.pattern == first
        saved = (dout, q, k, v, out, lse)
        if write and varlen is None and _backward_in_place(backend, task, saved, (dq, dk, dv), causal, scale):
            continue
        grads = attend_backward(
            backend,
            sel.gather(dout),
            sel.gather(q),
            kv.gather(k),
            kv.gather(v),
            sel.gather(out),
            sel.gather(lse).transpose(1, 2),
            varlen,
            causal=causal,
            scale=scale,
        )
        if write:
            for where, dst, grad in ((sel, dq, grads[0]), (kv, dk, grads[1]), (kv, dv, grads[2])):
                where.put(dst, grad)
        else:
            add_call_grads(sel, kv, grads, dq, dk, dv)
        del grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_in_place(
    backend: AttentionBackend,
    task: Call,
    saved: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    causal: bool,
    scale: float,
) -> bool:
    """Run a written (not added) call's backward straight into views of ``grads`` (dq, dk, dv), where
    the backend offers it (``backward_into``) and the selections are views; False if it did not.

    ``saved``: (dout, q, k, v, out, lse) of the whole step.
    """
    into = getattr(backend, "backward_into", None)
    if into is None or isinstance(task, PackedTask):
        return False
    sel, kv = task.query, task.key_value
    targets = (sel.view(grads[0]), kv.view(grads[1]), kv.view(grads[2]))
    if any(t is None for t in targets):
        return False
    dout, q, k, v, out, lse = saved
    lse_i = sel.gather(lse).transpose(1, 2)
    into(sel.gather(dout), sel.gather(q), kv.gather(k), kv.gather(v), sel.gather(out), lse_i, targets,
         causal=causal, scale=scale)  # fmt: skip
    return True


class DilatedAttentionFunction(torch.autograd.Function):
    """One autograd node for all patterns; saves q, k, v, O, L (no per-pattern copies)."""

    @staticmethod
    def forward(ctx, q, k, v, tasks, backend, causal, scale, documents=None):  # noqa: D102
        out, lse = dilated_forward(q, k, v, tasks, backend, causal=causal, scale=scale, documents=documents)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tasks, ctx.backend, ctx.causal, ctx.scale = tasks, backend, causal, scale
        ctx.documents = documents
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = dilated_backward(
            dout, q, k, v, out, lse, ctx.tasks, ctx.backend, causal=ctx.causal, scale=ctx.scale,
            documents=ctx.documents,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None
