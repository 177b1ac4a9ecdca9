"""The forward's merge done once at the end: each pattern's results land in a compact buffer of their own.

docs/design.md section 1 merges the patterns' (O_i, L_i) by log-sum-exp. The online merge (:mod:`.merge`)
re-reads a float32 accumulator the size of the whole output once per call and casts it to q's dtype at
the end. Here every call writes its output (q's dtype, as the kernel returns it) and log-sum-exp into a
per-pattern buffer, as the kernel's own ``out=``/``lse=`` where the backend takes them
(``forward_into``), and one pass folds the patterns of every (position, head) together in float32 and
rounds once: the same arithmetic on the same inputs, with a third of the memory traffic and one launch
instead of one per call.

Layout (docs/design.md section 1, with w a multiple of r): pattern (w, r) selects local row i of local
head h iff ``(i - h + c) mod r == 0``, where ``c = (position_offset - head_offset) mod r``, so one head's
selected rows have distinct ``i // r``. Pattern k's results therefore fit ``Y_k [B, ceil(N / r), H, D]``
at ``(b, i // r, h)``, with log-sum-exp ``LY_k [H, B, ceil(N / r)]``. A task (rows ``start + s*w + j*r``,
heads ``o::r``) is then the view ``Y_k[:, start // r + s * w / r + j, o::r]``, and its log-sum-exp view
``[B*S, Hs, L]`` has L contiguous, the layout FA4 writes. The first pattern with r = 1 (every config has one;
it covers every (position, head)) writes straight into the output. Plans this does not fit (documents, w not a multiple
of r, tasks not covering their pattern's rows) keep the online merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .indexing import AttentionTask, Selection
from .packing import PackedTask

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch merge serves
    triton = None

# False: every plan takes the online merge (benchmarks compare the two).
ENABLED = True
# (position, head) rows per program of the merge kernel, and its warps (tools/bench_merge.py sweeps them;
# docs/attention.md has the figures, and those of a layout over positions of one head that was slower).
BLOCK_ROWS = 16
NUM_WARPS = 4

Call = AttentionTask | PackedTask


@dataclass(frozen=True)
class PatternLayout:
    """Where pattern k's results live: rows ``i // r`` of heads with ``(i - h + c) mod r == 0``."""

    pattern: int
    dilation: int
    phase: int  # c above
    rows: int  # ceil(N / r): M_k
    base: bool  # r = 1, written straight into the output
    y_offset: int = 0  # first row of Y_k in the shared buffer (units of H * D elements)
    ly_offset: int = 0  # first element of LY_k in the shared log-sum-exp buffer


@dataclass
class DeferredLayout:
    """The buffers of one plan on q of one shape, and the destination of every kernel call."""

    shape: tuple[int, int, int, int]
    patterns: dict[int, PatternLayout]
    y_rows: int  # rows of the shared buffer, B * sum of non-base M_k
    ly_size: int
    _flat: dict[int, list[tuple[PatternLayout, slice, torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    _meta: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def meta(self, device: torch.device) -> torch.Tensor:
        """(r, c, M, Y offset, LY offset) of every non-base pattern, int64 on ``device`` (made once)."""
        hit = self._meta.get(device)
        if hit is None:
            rows = [[p.dilation, p.phase, p.rows, p.y_offset, p.ly_offset] for p in self.patterns.values()
                    if not p.base]  # fmt: skip
            hit = self._meta[device] = torch.tensor(
                rows or [[1, 0, 0, 0, 0]], dtype=torch.int64, device=device
            )
        return hit

    @property
    def base(self) -> PatternLayout:
        """The (first) r = 1 pattern, written straight into the output."""
        return next(p for p in self.patterns.values() if p.base)


def _selected_count(n: int, h: int, r: int, c: int) -> int:
    """How many (row < n, head < h) pairs have (i - head + c) mod r == 0."""
    total = 0
    for head in range(h):
        first = (head - c) % r
        total += 0 if first >= n else (n - 1 - first) // r + 1
    return total


def deferred_layout(
    tasks: Sequence[AttentionTask], shape: tuple[int, int, int, int]
) -> DeferredLayout | None:
    """The layout of ``tasks`` on q of ``shape`` ``[B, N, H, D]``, or None where the plan does not fit it."""
    b, n, h, _ = shape
    found: dict[int, tuple[int, int]] = {}
    counts: dict[int, int] = {}
    for task in tasks:
        rows, heads = task.query.rows, task.query.heads
        r = rows.step
        if not isinstance(heads, slice) or rows.segment_stride % r:
            return None
        head_range = range(h)[heads]
        if len(head_range) == 0:
            continue
        if len(head_range) > 1 and head_range.step % r:
            return None
        phase = (head_range.start - rows.start) % r
        if found.setdefault(task.pattern, (r, phase)) != (r, phase):
            return None
        counts[task.pattern] = counts.get(task.pattern, 0) + rows.num_segments * rows.length * len(head_range)
    if not found:
        return None
    patterns: dict[int, PatternLayout] = {}
    y_rows = ly_size = 0
    base_taken = False
    for pattern in sorted(found):
        r, phase = found[pattern]
        if counts[pattern] != _selected_count(n, h, r, phase):
            return None  # the tasks do not cover their pattern's rows: keep the online merge
        m = -(-n // r)
        if r == 1 and not base_taken:
            patterns[pattern] = PatternLayout(pattern, r, phase, m, base=True)
            base_taken = True
            continue
        patterns[pattern] = PatternLayout(pattern, r, phase, m, False, y_rows, ly_size)
        y_rows += b * m
        ly_size += h * b * m
    if not base_taken:
        return None  # configs always hold r = 1 (DilatedAttentionConfig); without it, the online merge
    return DeferredLayout(shape, patterns, y_rows, ly_size)


def _view_targets(
    layout: DeferredLayout, p: PatternLayout, sel: Selection, y: torch.Tensor, ly: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out [B*S, L, Hs, D], lse [B*S, Hs, L])`` views of pattern ``p``'s buffers for ``sel``, or None
    where B and the segments do not merge into one dimension (B > 1 and a block short of all rows)."""
    rows = sel.rows
    seg = rows.segment_stride // p.dilation
    m0 = rows.start // p.dilation
    span = (rows.num_segments - 1) * seg + rows.length
    if rows.num_segments > 1 and rows.length > seg:
        return None
    if rows.num_segments > 1:
        span = rows.num_segments * seg
    if m0 + span > p.rows:
        return None
    out = y[:, m0 : m0 + span, sel.heads]
    lse = ly[sel.heads, :, m0 : m0 + span]
    if rows.num_segments > 1:
        out = out.unflatten(1, (rows.num_segments, seg))[:, :, : rows.length]
        lse = lse.unflatten(2, (rows.num_segments, seg))[..., : rows.length]
    else:
        out, lse = out[:, None], lse[:, :, None]
    lse = lse.permute(1, 2, 0, 3)  # [B, S, Hs, L]
    try:
        return out.view(-1, *out.shape[2:]), lse.view(-1, *lse.shape[2:])
    except RuntimeError:
        return None


def _flat_parts(
    layout: DeferredLayout, call: Call, device: torch.device
) -> list[tuple[PatternLayout, slice, torch.Tensor, torch.Tensor]]:
    """(pattern, its sequences of the call, output row index, log-sum-exp index) of each part of a call,
    indices into the flattened buffers (the output's for the base pattern)."""
    key = id(call)
    hit = layout._flat.get(key)
    if hit is not None:
        return hit
    b, n, h, _ = layout.shape
    if isinstance(call, PackedTask):
        flat = call.query.flat.view(call.query.shape)
        parts = [(pattern, slice(start, start + count)) for pattern, start, count in call.split_parts()]
    else:
        sel = call.query
        rows = sel.rows.row_index(device)[None, :, :, None]
        heads = torch.arange(h, device=device)[sel.heads]
        batch = torch.arange(b, device=device)[:, None, None, None]
        flat = ((batch * n + rows) * h + heads).flatten(0, 1)  # [B*S, L, Hs]
        parts = [(call.pattern, slice(0, flat.shape[0]))]
    out = []
    for pattern, seqs in parts:
        p = layout.patterns[pattern]
        f = flat[seqs].reshape(-1)
        batch, row, head = f // (n * h), f // h % n, f % h
        m = row // p.dilation
        y_index = (p.y_offset + batch * p.rows + m) * h + head
        ly_index = p.ly_offset + (head * b + batch) * p.rows + m
        out.append((p, seqs, y_index, ly_index))
    layout._flat[key] = out
    return out


class DeferredMerge:
    """The buffers of one forward; :meth:`write` takes each call, :meth:`finish` merges them."""

    def __init__(self, layout: DeferredLayout, q: torch.Tensor, acc_dtype: torch.dtype) -> None:
        b, n, h, d = layout.shape
        self.layout = layout
        self.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.base_lse = torch.empty(h, b, n, dtype=acc_dtype, device=q.device)
        self.y = torch.empty(layout.y_rows, h, d, dtype=q.dtype, device=q.device)
        self.ly = torch.empty(layout.ly_size, dtype=acc_dtype, device=q.device)

    def _buffers(self, p: PatternLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Pattern ``p``'s ``(Y [B, M, H, D], LY [H, B, M])``."""
        b, _, h, d = self.layout.shape
        if p.base:
            return self.out, self.base_lse
        y = self.y[p.y_offset : p.y_offset + b * p.rows].view(b, p.rows, h, d)
        ly = self.ly[p.ly_offset : p.ly_offset + h * b * p.rows].view(h, b, p.rows)
        return y, ly

    def targets(self, call: Call) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views the kernel can write this call's ``(out, lse)`` into, or None (then :meth:`write`)."""
        if isinstance(call, PackedTask):
            return None
        p = self.layout.patterns[call.pattern]
        y, ly = self._buffers(p)
        return _view_targets(self.layout, p, call.query, y, ly)

    def write(self, call: Call, o_i: torch.Tensor, l_i: torch.Tensor) -> None:
        """Store a call's ``(O_i [M, L, Hs, D], L_i [M, Hs, L])`` in its patterns' buffers."""
        views = self.targets(call)
        if views is not None:
            views[0].copy_(o_i)
            views[1].copy_(l_i)
            return
        d = self.layout.shape[3]
        for p, seqs, y_index, ly_index in _flat_parts(self.layout, call, o_i.device):
            y, ly = (self.out, self.base_lse) if p.base else (self.y, self.ly)
            y.view(-1, d).index_copy_(0, y_index, o_i[seqs].reshape(-1, d).to(y.dtype))
            ly.view(-1).index_copy_(0, ly_index, l_i[seqs].transpose(1, 2).reshape(-1).to(ly.dtype))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged ``(out [B, N, H, D] in q's dtype, lse [B, N, H] float32/64)``."""
        b, n, h, _ = self.layout.shape
        lse = torch.empty(b, n, h, dtype=self.base_lse.dtype, device=self.out.device)
        others = [p for p in self.layout.patterns.values() if not p.base]
        if _fused_applies(self.out, lse):
            merge_fused(self, others, lse)
        else:
            merge_torch(self, others, lse)
        return self.out, lse


def _fused_applies(out: torch.Tensor, lse: torch.Tensor) -> bool:
    return triton is not None and out.is_cuda and lse.dtype == torch.float32


def merge_torch(state: DeferredMerge, others: Sequence[PatternLayout], lse: torch.Tensor) -> None:
    """The final merge in PyTorch ops: pattern by pattern, L = logaddexp(L, L_k), O += (O_k - O) exp(L_k - L)."""
    b, n, h, d = state.layout.shape
    device = state.out.device
    acc = lse.dtype
    out = state.out.to(acc)
    lse.copy_(state.base_lse.permute(1, 2, 0))
    i = torch.arange(n, device=device)[:, None]
    heads = torch.arange(h, device=device)[None, :]
    for p in others:
        y, ly = state._buffers(p)
        rows, cols = torch.nonzero((i - heads + p.phase) % p.dilation == 0, as_tuple=True)
        m = rows // p.dilation
        o_k = y[:, m, cols].to(acc)  # [B, C, D]
        l_k = ly[cols, :, m].transpose(0, 1)  # [B, C]
        l_old = lse[:, rows, cols]
        l_new = torch.logaddexp(l_old, l_k)
        weight = torch.exp(l_k - l_new).nan_to_num_(nan=0.0)
        o_old = out[:, rows, cols]
        out[:, rows, cols] = o_old + (o_k - o_old) * weight[..., None]
        lse[:, rows, cols] = l_new
    state.out.copy_(out)


def merge_fused(state: DeferredMerge, others: Sequence[PatternLayout], lse: torch.Tensor) -> None:
    """The final merge as one Triton kernel: each program folds every pattern into a block of rows."""
    b, n, h, d = state.layout.shape
    total = b * n * h
    if total == 0:
        return
    meta = state.layout.meta(state.out.device)
    grid = (triton.cdiv(total, BLOCK_ROWS),)
    _deferred_merge_kernel[grid](
        state.out, state.base_lse, lse, state.y, state.ly, meta, len(others), total, b, n, h,
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_ROWS=BLOCK_ROWS, num_warps=NUM_WARPS,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _deferred_merge_kernel(
        out_ptr, base_lse_ptr, lse_ptr, y_ptr, ly_ptr, meta_ptr, num_patterns, total, batch, n, h,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):  # fmt: skip
        """Rows t = (b * n + i) * h + head of the output, which holds the r = 1 pattern's results; each
        row folds in every other pattern that selects it."""
        t = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = t < total
        head = t % h
        i = (t // h) % n
        b = t // (h * n)
        cols = tl.arange(0, BLOCK_D)
        col_ok = (cols < D)[None, :]
        out_at = out_ptr + t[:, None] * D + cols[None, :]
        o = tl.load(out_at, mask=live[:, None] & col_ok, other=0.0).to(tl.float32)
        lse = tl.load(base_lse_ptr + (head * batch + b) * n + i, mask=live, other=float("-inf"))
        for k in range(num_patterns):
            r = tl.load(meta_ptr + k * 5)
            phase = tl.load(meta_ptr + k * 5 + 1)
            rows = tl.load(meta_ptr + k * 5 + 2)
            y_offset = tl.load(meta_ptr + k * 5 + 3)
            ly_offset = tl.load(meta_ptr + k * 5 + 4)
            chosen = live & ((i + phase + r * h - head) % r == 0)
            m = i // r
            l_k = tl.load(
                ly_ptr + ly_offset + (head * batch + b) * rows + m, mask=chosen, other=float("-inf")
            )
            top = tl.maximum(lse, l_k)
            top = tl.where(top == float("-inf"), 0.0, top)  # both -inf: the sum is 0, L stays -inf
            l_new = top + tl.log(tl.exp(lse - top) + tl.exp(l_k - top))
            weight = tl.where(l_new == float("-inf"), 0.0, tl.exp(l_k - l_new))
            y_at = y_ptr + ((y_offset + b * rows + m) * h + head)[:, None] * D + cols[None, :]
            o_k = tl.load(y_at, mask=chosen[:, None] & col_ok, other=0.0).to(tl.float32)
            o = o + (o_k - o) * weight[:, None]
            lse = l_new
        tl.store(out_at, o.to(out_ptr.dtype.element_ty), mask=live[:, None] & col_ok)
        tl.store(lse_ptr + t, lse, mask=live)
