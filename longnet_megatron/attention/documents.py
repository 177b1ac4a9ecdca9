"""Document masking for packed sequences (docs/design.md section 7): kernel calls split by document.

A document is a maximal run of equal ids in ``document_ids`` ``[B, N]``; a query never attends a key of
another document. In one segment of one pattern the selected rows of a document are contiguous in
selection order, so a kernel call's ``[M, L]`` rows (M sequences: segments x batch) split into runs,
one per (sequence, document), and the call becomes a variable-length batch over those runs
(``cu_seqlens``, as flash-attention's varlen functions and cuDNN's THD layout take it). Sequences that
lie inside one document need no mask and keep the dense call:

* a call with no document boundary in any of its sequences is today's dense call, unchanged;
* otherwise, when the backend's variable-length kernel is slower than its dense one
  (``varlen_cost`` > 1, e.g. PyTorch's flash kernel against cuDNN), runs of consecutive whole-document
  segments stay dense calls on views (at least :data:`DENSE_RUN_ELEMENTS` query elements each) and the
  other segments form one variable-length call; else the whole call runs variable-length, on the
  same (view) selection.

Every query is its own key in every pattern that selects it, so no run is empty and no query row is
without keys. The decisions need a few device-to-host copies; :class:`Documents` makes them once per
batch and plan and every layer with that plan reuses them (forward and backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backends.base import AttentionBackend, VarlenBackend
from .indexing import AttentionTask, RowBlock, Selection
from .packing import PackedSelection, PackedTask

# A run of whole-document segments stays a dense call when its query holds at least this many
# elements (2^24: 32 MiB in bf16, four 2048-row segments of 16 heads x 128); shorter runs join the
# variable-length call, where the launch and merge they would cost are not paid.
DENSE_RUN_ELEMENTS = 1 << 24

Call = AttentionTask | PackedTask


@dataclass(frozen=True)
class Varlen:
    """A kernel call run as a variable-length batch over its flattened ``M * L`` rows.

    cu_seqlens: int32 ``[P + 1]``: the first row of each run (one document inside one sequence), then
        the total; every run lies inside one of the call's sequences.
    max_seqlen: a bound on a run's length (the call's sequence length L).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int


def document_ids_from_eod(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Document ids ``[B, N]`` of packed token ids: each end-of-document token closes its document."""
    is_eod = (tokens == eod_token).to(torch.int32)
    return torch.cumsum(is_eod, dim=-1) - is_eod


def document_bounds(
    document_ids: torch.Tensor, position_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``[start, end)`` of each token's document, ``[B, N]`` int32 each (runs of equal ids)."""
    _check_ids(document_ids)
    b, n = document_ids.shape
    pos = torch.arange(n, device=document_ids.device).expand(b, n)
    change = document_ids[:, 1:] != document_ids[:, :-1]
    edge = torch.ones(b, 1, dtype=torch.bool, device=document_ids.device)
    starts = torch.where(torch.cat([edge, change], 1), pos, torch.zeros_like(pos)).cummax(1).values
    is_end = torch.cat([change, edge], 1)
    ends = torch.where(is_end, pos + 1, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    return (starts + position_offset).to(torch.int32), (ends + position_offset).to(torch.int32)


def _check_ids(document_ids: torch.Tensor) -> None:
    if document_ids.dim() != 2 or document_ids.is_floating_point() or document_ids.is_complex():
        raise ValueError(
            f"document_ids must be an integer tensor [batch, seq], got {document_ids.dtype} "
            f"of shape {tuple(document_ids.shape)}"
        )


class Documents:
    """The documents of one packed batch, and what the kernels need of them, computed once.

    ``document_ids`` ``[B, N]``: this rank's tokens (under context parallelism its contiguous chunk; a
    run at the chunk's edge continues a run of the neighbouring rank when the ids there are equal).
    Create one per batch and pass it to every layer: the per-call layouts (and, under context
    parallelism, the document spans across ranks) are cached on it.
    """

    def __init__(self, document_ids: torch.Tensor) -> None:
        _check_ids(document_ids)
        self.ids = document_ids
        b = document_ids.shape[0]
        change = (document_ids[:, 1:] != document_ids[:, :-1]).to(torch.int32)
        first = torch.zeros(b, 1, dtype=torch.int32, device=document_ids.device)
        self.runs = torch.cat([first, change], 1).cumsum(1, dtype=torch.int32)  # run index per token
        self._cache: dict[Any, tuple[Any, Any]] = {}

    @classmethod
    def from_eod(cls, tokens: torch.Tensor, eod_token: int) -> Documents:
        """The documents of packed token ids ``[B, N]`` whose documents end with ``eod_token``."""
        return cls(document_ids_from_eod(tokens, eod_token))

    def check(self, q: torch.Tensor) -> None:
        """Raise ValueError unless these documents cover q's ``[B, N]`` tokens, on q's device."""
        if tuple(self.ids.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"document_ids must be [batch, seq] = {tuple(q.shape[:2])}, got {tuple(self.ids.shape)}"
            )
        if self.ids.device != q.device:
            raise ValueError(f"document_ids are on {self.ids.device}, q on {q.device}")

    def cached(self, key: Any, keep: Any, make: Callable[[], Any]) -> Any:
        """``make()``, remembered under ``key``; ``keep`` (whose id is part of the key) is held alive."""
        hit = self._cache.get(key)
        if hit is None or hit[0] is not keep:
            hit = self._cache[key] = (keep, make())
        return hit[1]

    def calls(
        self, calls: Sequence[Call], q: torch.Tensor, kv_heads: int, backend: AttentionBackend
    ) -> list[tuple[Call, Varlen | None]]:
        """``calls`` (of q ``[B, N, H, D]``) split by document; None marks a dense call."""
        cost = varlen_cost(backend)
        key = ("calls", id(calls), cost, q.shape, kv_heads, DENSE_RUN_ELEMENTS)
        return self.cached(key, calls, lambda: _split_calls(calls, self.runs, q.shape, kv_heads, cost))


def varlen_cost(backend: AttentionBackend) -> float:
    """Time of the backend's variable-length path per row relative to its dense kernel's."""
    if not isinstance(backend, VarlenBackend):
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r} has no variable-length path")
    return float(backend.varlen_cost)


def _split_calls(
    calls: Sequence[Call], runs: torch.Tensor, shape: torch.Size, kv_heads: int, cost: float
) -> list[tuple[Call, Varlen | None]]:
    out: list[tuple[Call, Varlen | None]] = []
    for call in calls:
        out += _split_call(call, runs, shape, kv_heads, dense_runs=cost > 1.0)
    return out


def _boundaries(sel: Selection | PackedSelection, runs: torch.Tensor) -> torch.Tensor:
    """``[M, L - 1]``: whether a document boundary lies between consecutive selected rows."""
    rows = sel.gather_rows(runs)
    return rows[:, 1:] != rows[:, :-1]


def _varlen(boundary: torch.Tensor) -> Varlen:
    """The runs of ``[M, L]`` rows whose boundaries ``[M, L - 1]`` are given."""
    m, length = boundary.shape[0], boundary.shape[1] + 1
    first = torch.ones(m, 1, dtype=torch.bool, device=boundary.device)
    starts = torch.cat([first, boundary], 1).reshape(-1)
    index = starts.nonzero().squeeze(1)
    total = index.new_tensor([starts.numel()])
    return Varlen(torch.cat([index, total]).to(torch.int32), length)


def _split_call(
    call: Call, runs: torch.Tensor, shape: torch.Size, kv_heads: int, dense_runs: bool
) -> list[tuple[Call, Varlen | None]]:
    boundary = _boundaries(call.query, runs)
    if boundary.shape[1] == 0:  # one-row sequences hold no boundary
        return [(call, None)]
    mixed = boundary.any(1)
    if isinstance(call, PackedTask) or not dense_runs:
        return [(call, _varlen(boundary) if bool(mixed.any()) else None)]
    b, n, h, d = shape
    block = call.query.rows
    segment_mixed = mixed.view(b, block.num_segments).any(0).tolist()
    if not any(segment_mixed):
        return [(call, None)]
    per_segment = b * block.length * call.query.num_heads(h) * d
    min_run = max(1, math.ceil(DENSE_RUN_ELEMENTS / per_segment))
    dense = _whole_runs(segment_mixed, min_run)
    if not dense:
        return [(call, _varlen(boundary))]
    out: list[tuple[Call, Varlen | None]] = []
    for first, count in dense:
        part = RowBlock(block.start + first * block.segment_stride, count, block.length, block.segment_stride,
                        block.step)  # fmt: skip
        out.append((AttentionTask(call.pattern, Selection(part, call.query.heads),
                                  Selection(part, call.key_value.heads)), None))  # fmt: skip
    in_dense = {s for first, count in dense for s in range(first, first + count)}
    rest = [s for s in range(block.num_segments) if s not in in_dense]  # holds every mixed segment

    def one(s: int) -> RowBlock:
        return RowBlock(
            block.start + s * block.segment_stride, 1, block.length, block.segment_stride, block.step
        )

    query = PackedSelection.stack([Selection(one(s), call.query.heads) for s in rest], b, n, h, runs.device)
    key_value = PackedSelection.stack(
        [Selection(one(s), call.key_value.heads) for s in rest], b, n, kv_heads, runs.device
    )
    packed = PackedTask(call.pattern, query, key_value)
    out.append((packed, _varlen(_boundaries(query, runs))))
    return out


def _whole_runs(mixed: list[bool], min_run: int) -> list[tuple[int, int]]:
    """(first, count) of each maximal run of whole-document segments at least ``min_run`` long."""
    found, start = [], None
    for s, is_mixed in enumerate([*mixed, True]):
        if not is_mixed and start is None:
            start = s
        elif is_mixed and start is not None:
            if s - start >= min_run:
                found.append((start, s - start))
            start = None
    return found


# --------------------------------------------------------------------------------------------------
# the variable-length kernel boundary, in the dense calls' shapes
# --------------------------------------------------------------------------------------------------
def attend(
    backend: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    varlen: Varlen | None,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend.forward`` of ``[M, L, H, D]`` tensors, variable-length when ``varlen`` is given.

    Returns ``(out [M, L, H, D], lse [M, H, L])`` either way.
    """
    if varlen is None:
        return backend.forward(q, k, v, causal=causal, scale=scale)
    m, length, h, d = q.shape
    flat = [t.reshape(m * length, h, d) for t in (q, k, v)]
    out, lse = backend.forward_varlen(*flat, varlen.cu_seqlens, varlen.max_seqlen, causal=causal, scale=scale)
    return out.view(m, length, h, d), lse.view(h, m, length).transpose(0, 1)


def attend_backward(
    backend: AttentionBackend,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    varlen: Varlen | None,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backend.backward`` in :func:`attend`'s shapes (lse ``[M, H, L]``): ``(dq, dk, dv)`` like q, k, v."""
    if varlen is None:
        return backend.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    m, length, h, d = q.shape
    flat = [t.reshape(m * length, h, d) for t in (dout, q, k, v, out)]
    lse_flat = lse.transpose(0, 1).reshape(h, m * length)
    grads = backend.backward_varlen(
        *flat, lse_flat, varlen.cu_seqlens, varlen.max_seqlen, causal=causal, scale=scale
    )
    return tuple(g.view(m, length, h, d) for g in grads)
