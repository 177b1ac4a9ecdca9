"""The online log-sum-exp merge of one call's (O_i, L_i) into the accumulators, in one fused kernel.

docs/design.md section 1: L = logaddexp(L, L_i), O = O + (O_i - O) * exp(L_i - L). In PyTorch ops this
is about ten kernels per call (gathers, logaddexp, exp, lerp, scatters); on short sequences the host
issuing them sets the pace, on long ones they re-read the float32 accumulator several times. The
Triton kernel here reads each selected accumulator row once and writes it once, one launch per call.
It runs on CUDA float32 accumulators; anything else takes :func:`merge_partial_torch`, the same
formula in PyTorch ops.
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

# Accumulator rows (one (position, head) each) per program.
_BLOCK_ROWS = 16
# False: every merge takes the PyTorch ops (benchmarks compare the two).
FUSED = True


def merge_partial(
    out: torch.Tensor,
    lse: torch.Tensor,
    sel: Selection | PackedSelection,
    o_i: torch.Tensor,
    l_i: torch.Tensor,
) -> None:
    """Fold one call's (O_i, L_i) (``[b, l, h, d]``, ``[b, h, l]``) into the selected part of (out, lse).

    The exact softmax-denominator weighting of docs/design.md section 1, applied online and in place,
    so no per-pattern buffer is kept. The selected (position, head) pairs must not repeat.
    """
    if _fused_applies(out, lse, sel, o_i):
        merge_partial_fused(out, lse, sel, o_i, l_i)
    else:
        merge_partial_torch(out, lse, sel, o_i, l_i)


def merge_partial_torch(
    out: torch.Tensor,
    lse: torch.Tensor,
    sel: Selection | PackedSelection,
    o_i: torch.Tensor,
    l_i: torch.Tensor,
) -> None:
    """:func:`merge_partial` in PyTorch ops: L = logaddexp(L, L_i); O = O + (O_i - O) * exp(L_i - L)."""
    l_i = l_i.transpose(1, 2).to(lse.dtype)
    l_old = sel.gather(lse)
    l_new = torch.logaddexp(l_old, l_i)
    weight = torch.exp(l_i - l_new).nan_to_num_(nan=0.0)  # nan: neither side saw a key, keep O
    view = sel.view(out)
    target = view if view is not None else sel.gather(out)
    target.lerp_(o_i.to(out.dtype), weight[..., None])
    if view is None:
        sel.put(out, target)
    sel.put(lse, l_new)


def _fused_applies(
    out: torch.Tensor, lse: torch.Tensor, sel: Selection | PackedSelection, o_i: torch.Tensor
) -> bool:
    """True when the Triton kernel takes this merge: on CUDA, in the layouts :func:`fused_takes` names.
    (Tests call the kernel on CPU tensors in Triton's interpreter.)"""
    return FUSED and triton is not None and out.is_cuda and fused_takes(out, lse, sel, o_i)


def fused_takes(
    out: torch.Tensor, lse: torch.Tensor, sel: Selection | PackedSelection, o_i: torch.Tensor
) -> bool:
    """Whether the kernel's layout fits: float32 contiguous accumulators, the output rows' last
    dimension contiguous, query heads a slice (or a packed selection)."""
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        return False
    if not (out.is_contiguous() and lse.is_contiguous() and o_i.stride(-1) == 1):
        return False
    return isinstance(sel, PackedSelection) or isinstance(sel.heads, slice)


def merge_partial_fused(
    out: torch.Tensor,
    lse: torch.Tensor,
    sel: Selection | PackedSelection,
    o_i: torch.Tensor,
    l_i: torch.Tensor,
) -> None:
    """:func:`merge_partial` as one Triton kernel (see :func:`_fused_applies` for what it takes)."""
    m, length, hs, d = o_i.shape
    total = m * length * hs
    if total == 0:
        return
    b, n, h = out.shape[:3]
    packed = isinstance(sel, PackedSelection)
    if packed:
        flat, start, segments, seg_stride, step, h0, hstep = sel.flat, 0, 1, 0, 0, 0, 0
    else:
        rows, heads = sel.rows, range(h)[sel.heads]
        flat = o_i  # unused: any tensor stands in for the pointer
        start, segments, seg_stride, step = rows.start, rows.num_segments, rows.segment_stride, rows.step
        h0, hstep = heads.start, heads.step
    grid = (triton.cdiv(total, _BLOCK_ROWS),)
    _merge_kernel[grid](
        out, lse, o_i, l_i, flat, total, length, hs, segments, n, h, start, seg_stride, step, h0, hstep,
        o_i.stride(0), o_i.stride(1), o_i.stride(2), l_i.stride(0), l_i.stride(1), l_i.stride(2),
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_ROWS=_BLOCK_ROWS, PACKED=packed,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr, lse_ptr, o_ptr, l_ptr, flat_ptr, total, length, hs_count, segments, n, h,
        start, seg_stride, step, h0, hstep, so_m, so_l, so_h, sl_m, sl_h, sl_l,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, PACKED: tl.constexpr,
    ):  # fmt: skip
        """Rows r = (m * length + j) * hs_count + hs of the call; each merges one accumulator row."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = r < total
        hs = r % hs_count
        j = (r // hs_count) % length
        m = r // (hs_count * length)
        if PACKED:
            dst = tl.load(flat_ptr + r, mask=live, other=0).to(tl.int64)
        else:
            pos = start + (m % segments) * seg_stride + j * step
            dst = ((m // segments) * n + pos) * h + h0 + hs * hstep
        l_new_part = tl.load(l_ptr + m * sl_m + hs * sl_h + j * sl_l, mask=live, other=0.0).to(tl.float32)
        l_old = tl.load(lse_ptr + dst, mask=live, other=0.0)
        top = tl.maximum(l_old, l_new_part)
        top = tl.where(top == float("-inf"), 0.0, top)  # both -inf: the sum below is 0, L stays -inf
        l_new = top + tl.log(tl.exp(l_old - top) + tl.exp(l_new_part - top))
        weight = tl.where(l_new == float("-inf"), 0.0, tl.exp(l_new_part - l_new))
        cols = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols < D)[None, :]
        acc_at = out_ptr + dst[:, None] * D + cols[None, :]
        acc = tl.load(acc_at, mask=mask, other=0.0)
        part = tl.load(o_ptr + m[:, None] * so_m + j[:, None] * so_l + hs[:, None] * so_h + cols[None, :],
                       mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        tl.store(acc_at, acc + (part - acc) * weight[:, None], mask=mask)
        tl.store(lse_ptr + dst, l_new, mask=live)
