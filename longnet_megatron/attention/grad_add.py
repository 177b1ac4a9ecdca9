"""One kernel call's gradients (dq_i, dk_i, dv_i) added into dq, dk, dv, in one fused kernel.

In the backward of dilated attention every call that does not write its gradients adds them into the
selected part of the accumulators: ``sel.add(dq, dq_i); kv.add(dk, dk_i); kv.add(dv, dv_i)``. On strided
views that is three elementwise kernels per call; with many small calls (large dilations, short
segments) the host issuing them sets the pace. The Triton kernel here does all three in one launch, with
the addressing of :mod:`.merge` (RowBlock fields and the head slice): each gradient element is read
once, each destination element read and written once, the sum computed in float32 and rounded once to
the destination's dtype, as ``Tensor.add_`` does. It runs on CUDA when both selections are strided
views; anything else takes the three :meth:`~.indexing.Selection.add` calls.
"""

from __future__ import annotations

import torch

from .indexing import Selection
from .packing import PackedSelection

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

# Elements (rows x power-of-two padded head dim) per program: 32 rows of 128, 16 of 256.
_BLOCK_ELEMENTS = 4096
# Destination and gradient dtypes the kernel takes (float64 keeps the PyTorch path).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# False: every call's gradients take the three Selection.add calls (benchmarks compare the two).
FUSED = True


def add_call_grads(
    sel: Selection | PackedSelection,
    kv: Selection | PackedSelection,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """``sel.add(dq, grads[0]); kv.add(dk, grads[1]); kv.add(dv, grads[2])``, in one launch where it can.

    ``grads`` are one call's ``[B*S, L, Hs, D]`` gradients of the query (``sel``) and key/value (``kv``)
    selections of the ``[B, N, H, D]`` accumulators. The fused kernel takes them on CUDA when both
    selections are strided views (see :func:`_fused_takes`); the result is the same either way.
    """
    if _fused_applies(sel, kv, grads, dq, dk, dv):
        _add_fused(sel, kv, grads, dq, dk, dv)
    else:
        _add_torch(sel, kv, grads, dq, dk, dv)


def _add_torch(
    sel: Selection | PackedSelection,
    kv: Selection | PackedSelection,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """:func:`add_call_grads` as the three selection adds (the reference, and the fallback)."""
    sel.add(dq, grads[0])
    kv.add(dk, grads[1])
    kv.add(dv, grads[2])


def _fused_applies(
    sel: Selection | PackedSelection,
    kv: Selection | PackedSelection,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> bool:
    """True when the Triton kernel takes these adds: on CUDA, in the layouts :func:`_fused_takes` names.
    (Tests call the kernel on CPU tensors in Triton's interpreter.)"""
    return (
        FUSED
        and triton is not None
        and all(t.is_cuda for t in (dq, dk, dv, *grads))
        and _fused_takes(sel, kv, grads, dq, dk, dv)
    )


def _fused_takes(
    sel: Selection | PackedSelection,
    kv: Selection | PackedSelection,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> bool:
    """Whether the kernel's layout fits: both selections strided views (rows one progression inside
    the tensor, heads a slice), contiguous float16/bfloat16/float32 accumulators, dk and dv of one
    shape, each gradient of exactly its selection's shape (no broadcasting) with a contiguous last
    dimension."""
    if not (isinstance(sel, Selection) and isinstance(kv, Selection)):
        return False
    if dk.shape != dv.shape or any(t.dtype not in _DTYPES for t in (dq, dk, dv, *grads)):
        return False
    if not all(t.is_contiguous() for t in (dq, dk, dv)) or any(g.stride(-1) != 1 for g in grads):
        return False
    want_q, want_kv = _view_shape(sel, dq), _view_shape(kv, dk)
    if want_q is None or want_kv is None:
        return False
    return grads[0].shape == want_q and grads[1].shape == want_kv and grads[2].shape == want_kv


def _view_shape(where: Selection, x: torch.Tensor) -> tuple[int, ...] | None:
    """The shape ``[B*S, L, Hs, D]`` of ``where``'s view of the 4-d ``x``, or None when ``where`` is no
    strided view of it that the kernel's addressing reaches (rows outside ``x`` included)."""
    rows = where.rows
    if x.dim() != 4 or not (rows.is_strided and isinstance(where.heads, slice)):
        return None
    last = rows.start + (rows.num_segments * rows.length - 1) * rows.step
    if rows.start < 0 or rows.step < 1 or rows.length < 1 or last >= x.shape[1]:
        return None
    b, _, h, d = x.shape
    return (b * rows.num_segments, rows.length, len(range(h)[where.heads]), d)


def _add_fused(
    sel: Selection,
    kv: Selection,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """:func:`add_call_grads` as one Triton kernel (see :func:`_fused_takes` for what it takes).

    The grid's first programs add query gradient rows, the rest key/value rows, each of those adding
    one row block of dk and the same one of dv; a row is one (position, head) of D elements.
    """
    gq, gk, gv = grads
    block_d = triton.next_power_of_2(max(dq.shape[3], dk.shape[3]))
    block_rows = max(1, _BLOCK_ELEMENTS // block_d)
    q_total, kv_total = gq.shape[0] * gq.shape[1] * gq.shape[2], gk.shape[0] * gk.shape[1] * gk.shape[2]
    q_programs, kv_programs = triton.cdiv(q_total, block_rows), triton.cdiv(kv_total, block_rows)
    if q_programs + kv_programs == 0:
        return
    qr, kr = sel.rows, kv.rows
    qh, kh = range(dq.shape[2])[sel.heads], range(dk.shape[2])[kv.heads]
    _grad_add_kernel[(q_programs + kv_programs,)](
        dq, dk, dv, gq, gk, gv, q_programs,
        q_total, qr.length, gq.shape[2], qr.num_segments, dq.shape[1], dq.shape[2],
        qr.start, qr.segment_stride, qr.step, qh.start, qh.step, gq.stride(0), gq.stride(1), gq.stride(2),
        kv_total, kr.length, gk.shape[2], kr.num_segments, dk.shape[1], dk.shape[2],
        kr.start, kr.segment_stride, kr.step, kh.start, kh.step, gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2),
        D_Q=dq.shape[3], D_KV=dk.shape[3], BLOCK_D=block_d, BLOCK_ROWS=block_rows,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _add_rows(
        dst_ptr, src_ptr, r, total, length, hs_count, segments, n, h, start, seg_stride, step, h0, hstep,
        s_m, s_l, s_h, D: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """dst[row r] += src[row r] for the rows r = (m * length + j) * hs_count + hs of one selection,
        in float32, rounded once to dst's dtype. dst rows are D contiguous elements, so a block of
        [rows, BLOCK_D] reads and writes whole rows (consecutive heads of a position lie side by side)."""
        live = r < total
        hs = r % hs_count
        j = (r // hs_count) % length
        m = r // (hs_count * length)
        pos = start + (m % segments) * seg_stride + j * step
        dst = ((m // segments) * n + pos) * h + h0 + hs * hstep
        cols = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols < D)[None, :]
        at = dst_ptr + dst[:, None] * D + cols[None, :]
        acc = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        part = tl.load(src_ptr + m[:, None] * s_m + j[:, None] * s_l + hs[:, None] * s_h + cols[None, :],
                       mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        tl.store(at, (acc + part).to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_add_kernel(
        dq_ptr, dk_ptr, dv_ptr, gq_ptr, gk_ptr, gv_ptr, q_programs,
        q_total, q_length, q_hs, q_segments, q_n, q_h, q_start, q_seg_stride, q_step, q_h0, q_hstep,
        sq_m, sq_l, sq_h,
        kv_total, kv_length, kv_hs, kv_segments, kv_n, kv_h, kv_start, kv_seg_stride, kv_step, kv_h0,
        kv_hstep, sk_m, sk_l, sk_h, sv_m, sv_l, sv_h,
        D_Q: tl.constexpr, D_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):  # fmt: skip
        """Programs below q_programs add a block of dq rows; the others one of dk rows and the same of dv."""
        pid = tl.program_id(0)
        if pid < q_programs:
            r = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            _add_rows(dq_ptr, gq_ptr, r, q_total, q_length, q_hs, q_segments, q_n, q_h, q_start,
                      q_seg_stride, q_step, q_h0, q_hstep, sq_m, sq_l, sq_h, D_Q, BLOCK_D)  # fmt: skip
        else:
            r = (pid - q_programs).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            _add_rows(dk_ptr, gk_ptr, r, kv_total, kv_length, kv_hs, kv_segments, kv_n, kv_h, kv_start,
                      kv_seg_stride, kv_step, kv_h0, kv_hstep, sk_m, sk_l, sk_h, D_KV, BLOCK_D)  # fmt: skip
            _add_rows(dv_ptr, gv_ptr, r, kv_total, kv_length, kv_hs, kv_segments, kv_n, kv_h, kv_start,
                      kv_seg_stride, kv_step, kv_h0, kv_hstep, sv_m, sv_l, sv_h, D_KV, BLOCK_D)  # fmt: skip
