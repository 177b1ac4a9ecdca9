"""The project's own attention kernel in Triton: flash-attention forward with log-sum-exp, and backward.

It implements the backend interface of :mod:`.base`: tensors ``[batch, length, heads, head_dim]``
with ANY strides, so the strided views that :meth:`~..indexing.Selection.gather` returns for dilated
selections (r = 1, and w a multiple of r) are read in place by strided loads: no gathered copies and
no ``.contiguous()``. Batch and head offsets are computed in 64-bit, so 1M-token tensors are addressed
safely.

* forward: online softmax in base 2 (FlashAttention-2), returning ``out`` (like q, a fresh contiguous
  tensor) and the natural-log ``lse`` ``[b, h, l]`` float32.
* backward: given the MERGED ``out`` and ``lse`` (docs/design.md section 2), ``delta = rowsum(dO * O)`` is
  computed from that ``out`` by a small kernel, then one kernel accumulates dk, dv per key block
  (looping over query blocks) and one accumulates dq per query block (looping over key blocks); no
  atomics, no float32 buffers the size of q.
* ``causal`` is top-left aligned (query i sees keys j <= i); non-causal calls may be rectangular.
* variable-length batches (document masking): the ``[T, H, D]`` rows are one sequence to the same
  kernels, with each row's ``[start, end)`` (from ``cu_seqlens``) as a mask; a block reads only the
  keys (queries) of its rows' sequences, and a block inside one sequence runs mask-free.
* float16 and bfloat16; head_dim 16, 32, 64 or 128. The key/value head count must equal the query's
  (the caller expands grouped-query keys, as for every backend).

Blocks that need no mask (fully inside the key range and, for causal calls, fully below the diagonal)
run a mask-free loop; only the diagonal and tail blocks pay for masking.

Set ``TRITON_INTERPRET=1`` (with Triton installed) to run it on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .base import UnsupportedInputError, run_bounds

_HALF = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _visible(offs_m, cols, LK, row_ds, row_de, CAUSAL: tl.constexpr, DOC: tl.constexpr):
    """[rows, keys]: the key exists, (causal) is not after the row, (DOC) lies in the row's sequence."""
    valid = (cols < LK)[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    if DOC:
        valid = valid & (cols[None, :] >= row_ds[:, None]) & (cols[None, :] < row_de[:, None])
    return valid


@triton.jit
def _row_span(ds, de, ok, FAR):
    """(first start, last end, whether every valid row lies in one sequence) of a block's rows."""
    lo = tl.min(tl.where(ok, ds, FAR), 0)
    hi = tl.max(tl.where(ok, de, 0), 0)
    one = tl.max(tl.where(ok, ds, lo), 0) == lo
    return lo, hi, one


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, lo, hi, LK, qk_scale, row_ds, row_de,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_ok = cols < LK
            k = tl.load(K + cols[:, None] * skl + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            v = tl.load(V + cols[:, None] * svl + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(K + cols[:, None] * skl + offs_d[None, :])
            v = tl.load(V + cols[:, None] * svl + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m, cols, LK, row_ds, row_de, CAUSAL, DOC), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
        if DOC:  # a row may see none of a block's keys: keep exp2 away from -inf - -inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_range(BOUNDS, offs_m, row_ok, m0, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, DOC: tl.constexpr):  # fmt: skip
    """Keys [lo, hi) that query rows ``offs_m`` may see, the end of the mask-free part from lo, and the
    rows' sequences ``[ds, de)`` (DOC: read from BOUNDS ``[2, LK]``, starts then ends; else unused)."""
    hi = LK
    visible_end = LK  # keys below this are seen by every row
    if CAUSAL:
        hi = tl.minimum(LK, m0 + BLOCK_M)
        visible_end = tl.minimum(LK, m0)
    lo = hi * 0
    row_ds = offs_m
    row_de = offs_m
    if DOC:
        row_ds = tl.load(BOUNDS + offs_m, mask=row_ok, other=0)
        row_de = tl.load(BOUNDS + LK + offs_m, mask=row_ok, other=LK)
        lo, doc_hi, one = _row_span(row_ds, row_de, row_ok, LK)
        hi = tl.minimum(hi, doc_hi)
        visible_end = tl.where(one, tl.minimum(visible_end, doc_hi), lo)
    full_end = lo + (tl.maximum(visible_end - lo, 0) // BLOCK_N) * BLOCK_N
    return lo, full_end, hi, row_ds, row_de


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, BOUNDS,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sob, sol, soh,
    H, LQ, LK, qk_scale, NUM_M,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start_m = NUM_M - 1 - pid % NUM_M  # heavy (late, causal) query blocks first
    bh = pid // NUM_M
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    OUT += off_b * sob + off_h * soh
    LSE += bh.to(tl.int64) * LQ

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, full_end, hi, row_ds, row_de = _key_range(
        BOUNDS, offs_m, row_ok, m0, LK, BLOCK_M, BLOCK_N, CAUSAL, DOC
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, lo, full_end, LK, qk_scale, row_ds,
        row_de, BLOCK_N, CAUSAL, False, DOC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, full_end, hi, LK, qk_scale, row_ds,
        row_de, BLOCK_N, CAUSAL, True, DOC,
    )  # fmt: skip
    out = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(
        OUT + offs_m[:, None] * sol + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None]
    )
    tl.store(LSE + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(
    OUT, DO, DELTA, sob, sol, soh, sdob, sdol, sdoh, N, H, BM: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) per row and head, [B, H, N] float32 (64-bit row offsets)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    ok = rows < N
    offs_d = tl.arange(0, HEAD_DIM)
    r64 = rows.to(tl.int64)
    o = tl.load(OUT + b * sob + h * soh + r64[:, None] * sol + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(
        DO + b * sdob + h * sdoh + r64[:, None] * sdol + offs_d[None, :], mask=ok[:, None], other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + r64, delta, mask=ok)


def merged_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``rowsum(dout * out)`` ``[B, H, N]`` float32 of ``[B, N, H, D]`` tensors (any row/head strides).

    The backward's delta term, computed from the MERGED output (docs/design.md section 2); shared by the
    per-call and the fused kernels.
    """
    b, n, h, d = out.shape
    delta = torch.empty((b, h, n), dtype=torch.float32, device=out.device)
    _delta_kernel[(triton.cdiv(n, 64), b * h)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        n, h, BM=64, HEAD_DIM=d,
    )  # fmt: skip
    return delta


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m_base, offs_d, lo, hi, LQ, qk_scale,
    key_ds, key_de, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m_base
        row_ok = rows < LQ
        q = tl.load(Q + rows[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * sdl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # Rows past the end get lse = +inf, hence p = 0.
        lse2 = tl.load(LSE + rows * sll, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            if CAUSAL:
                p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
            if DOC:
                p_t = tl.where(
                    (rows[None, :] >= key_ds[:, None]) & (rows[None, :] < key_de[:, None]), p_t, 0.0
                )
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BOUNDS,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sdb, sdl, sdh,
    slb, slh, sll,
    sdkb, sdkl, sdkh,
    sdvb, sdvl, sdvh,
    H, LQ, LK, qk_scale, scale, NUM_N,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start_n = pid % NUM_N
    bh = pid // NUM_N
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdb + off_h * sdh
    LSE += off_b * slb + off_h * slh
    DELTA += bh.to(tl.int64) * LQ
    DK += off_b * sdkb + off_h * sdkh
    DV += off_b * sdvb + off_h * sdvh

    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < LK
    k = tl.load(K + offs_n[:, None] * skl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * svl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Queries [lo, hi) may see the key block: masked [lo, free_lo) (causal: the rows that straddle
    # the diagonal), mask-free [free_lo, free_hi), masked [free_hi, hi) (DOC: a partial sequence).
    lo = LQ * 0
    hi = LQ
    free_lo = lo
    if CAUSAL:
        lo = n0
        free_lo = tl.minimum(n0 + BLOCK_N, LQ)
    key_ds = offs_n
    key_de = offs_n
    free_hi = hi
    if DOC:
        key_ds = tl.load(BOUNDS + offs_n, mask=col_ok, other=LQ)
        key_de = tl.load(BOUNDS + LK + offs_n, mask=col_ok, other=0)
        doc_lo, doc_hi, one = _row_span(key_ds, key_de, col_ok, LQ)
        lo = tl.maximum(lo, doc_lo)
        hi = tl.minimum(hi, doc_hi)
        free_lo = tl.maximum(free_lo, lo)
        free_hi = tl.where(one, free_lo + (tl.maximum(hi - free_lo, 0) // BLOCK_M) * BLOCK_M, free_lo)
        free_lo = tl.where(one, free_lo, hi)
        free_hi = tl.where(one, free_hi, hi)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m, offs_d, lo, free_lo, LQ,
        qk_scale, key_ds, key_de, BLOCK_M, CAUSAL, True, DOC,
    )  # fmt: skip
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m, offs_d, free_lo, free_hi, LQ,
        qk_scale, key_ds, key_de, BLOCK_M, CAUSAL, False, DOC,
    )  # fmt: skip
    if DOC:
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m, offs_d, free_hi, hi, LQ,
            qk_scale, key_ds, key_de, BLOCK_M, CAUSAL, True, DOC,
        )  # fmt: skip
    dk = dk * scale
    tl.store(DK + offs_n[:, None] * sdkl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs_n[:, None] * sdvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n_base, offs_d, lo, hi, LK, qk_scale, row_ds,
    row_de, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n_base
        if MASKED:
            kv_ok = cols < LK
            k = tl.load(K + cols[:, None] * skl + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
            v = tl.load(V + cols[:, None] * svl + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(K + cols[:, None] * skl + offs_d[None, :])
            v = tl.load(V + cols[:, None] * svl + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, cols, LK, row_ds, row_de, CAUSAL, DOC), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BOUNDS,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sdb, sdl, sdh,
    slb, slh, sll,
    sdqb, sdql, sdqh,
    H, LQ, LK, qk_scale, scale, NUM_M,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start_m = NUM_M - 1 - pid % NUM_M
    bh = pid // NUM_M
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdb + off_h * sdh
    LSE += off_b * slb + off_h * slh
    DELTA += bh.to(tl.int64) * LQ
    DQ += off_b * sdqb + off_h * sdqh

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ
    q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m * sll, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, full_end, hi, row_ds, row_de = _key_range(
        BOUNDS, offs_m, row_ok, m0, LK, BLOCK_M, BLOCK_N, CAUSAL, DOC
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n, offs_d, lo, full_end, LK, qk_scale,
        row_ds, row_de, BLOCK_N, CAUSAL, False, DOC,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n, offs_d, full_end, hi, LK, qk_scale,
        row_ds, row_de, BLOCK_N, CAUSAL, True, DOC,
    )  # fmt: skip
    dq = dq * scale
    tl.store(DQ + offs_m[:, None] * sdql + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------
def _fwd_config(head_dim: int) -> dict[str, int]:
    if _interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if head_dim >= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _bwd_config(head_dim: int) -> dict[str, int]:
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if head_dim >= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` if every in-slice offset fits int32 and the head dim is unit-stride, else a contiguous copy."""
    b, length, h, d = x.shape
    if x.stride(3) == 1 and (length - 1) * abs(x.stride(1)) + d <= _INT32_MAX:
        return x
    return x.contiguous()


class TritonBackend:
    """Dense attention with log-sum-exp in the project's own Triton kernels (strided loads, no copies)."""

    name = "triton"
    varlen_cost = 1.0  # the same kernels, masked only where a block holds a sequence boundary

    def check(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if the kernel cannot take ``q``."""
        if q.device.type != "cuda" and not _interpreting():
            raise UnsupportedInputError(f"{self.name} backend needs CUDA tensors, got device {q.device}")
        if q.dtype not in _HALF:
            raise UnsupportedInputError(
                f"{self.name} backend needs float16 or bfloat16, got {str(q.dtype).removeprefix('torch.')}"
            )
        if q.shape[-1] not in _HEAD_DIMS:
            raise UnsupportedInputError(
                f"{self.name} backend needs head_dim in {_HEAD_DIMS}, got head_dim={q.shape[-1]}"
            )

    @staticmethod
    def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
        if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"triton backend needs q [b, lq, h, d] and k, v [b, lk, h, d]; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        if causal and q.shape[1] != k.shape[1]:
            raise ValueError(f"causal attention needs equal lengths, got {q.shape[1]} and {k.shape[1]}")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [b, l, h, d], lse [b, h, l] float32)`` of softmax(q k^T * scale) v."""
        return self._forward(q, k, v, causal, scale, None)

    def _forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
        bounds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        self.check(q)
        self._shapes(q, k, v, causal)
        b, lq, h, d = q.shape
        lk = k.shape[1]
        out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            return out, lse
        if lk == 0:
            return out.zero_(), lse.fill_(float("-inf"))
        q, k, v = _row_view(q), _row_view(k), _row_view(v)
        cfg = _fwd_config(d)
        num_m = triton.cdiv(lq, cfg["BLOCK_M"])
        _fwd_kernel[(num_m * b * h,)](
            q, k, v, out, lse, _bounds_arg(bounds, q),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, lq, lk, scale * _LOG2E, num_m,
            CAUSAL=causal, HEAD_DIM=d, DOC=bounds is not None, **cfg,
        )  # fmt: skip
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` given the merged ``out`` and ``lse`` (``[b, h, l]``)."""
        return self._backward(dout, q, k, v, out, lse, causal, scale, None)

    def _backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, causal: bool, scale: float, bounds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        self.check(q)
        self._shapes(q, k, v, causal)
        b, lq, h, d = q.shape
        lk = k.shape[1]
        alloc = torch.zeros if lk == 0 or lq == 0 else torch.empty  # every row is written otherwise
        dq = alloc((b, lq, h, d), dtype=q.dtype, device=q.device)
        dk = alloc((b, lk, h, d), dtype=k.dtype, device=q.device)
        dv = alloc((b, lk, h, d), dtype=v.dtype, device=q.device)
        if dq.numel() == 0 or dk.numel() == 0:
            return dq, dk, dv
        q, k, v, out, dout = (_row_view(t) for t in (q, k, v, out, dout))
        if lse.dtype != torch.float32:
            lse = lse.float()
        cfg = _bwd_config(d)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        num_m = triton.cdiv(lq, bm)
        delta = merged_delta(out, dout)
        common = (
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
        )  # fmt: skip
        num_n = triton.cdiv(lk, bn)
        doc = {"DOC": bounds is not None}
        _bwd_dkdv_kernel[(num_n * b * h,)](
            q, k, v, dout, lse, delta, dk, dv, _bounds_arg(bounds, q), *common,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            h, lq, lk, scale * _LOG2E, scale, num_n,
            CAUSAL=causal, HEAD_DIM=d, **doc, **cfg,
        )  # fmt: skip
        _bwd_dq_kernel[(num_m * b * h,)](
            q, k, v, dout, lse, delta, dq, _bounds_arg(bounds, q), *common,
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, lq, lk, scale * _LOG2E, scale, num_m,
            CAUSAL=causal, HEAD_DIM=d, **doc, **cfg,
        )  # fmt: skip
        return dq, dk, dv

    # -- variable-length batches (document masking) ---------------------------------------------
    def check_varlen(self, q: torch.Tensor) -> None:
        """The same limits as the dense calls."""
        self.check(q)

    def forward_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [t, h, d], lse [h, t] float32)`` of each sequence of the batch attending itself."""
        bounds = _row_bounds(cu_seqlens, q.shape[0])
        out, lse = self._forward(q[None], k[None], v[None], causal, scale, bounds)
        return out[0], lse[0]

    def backward_varlen(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` ``[t, h, d]`` given the merged ``out`` and ``lse`` ``[h, t]``."""
        bounds = _row_bounds(cu_seqlens, q.shape[0])
        tensors = (t[None] for t in (dout, q, k, v, out, lse))
        grads = self._backward(*tensors, causal, scale, bounds)
        return grads[0][0], grads[1][0], grads[2][0]


def _row_bounds(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[2, total]`` int32: each row's sequence start, then its end (the kernels' BOUNDS)."""
    return torch.stack(run_bounds(cu_seqlens, total)).to(torch.int32).contiguous()


def _bounds_arg(bounds: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``bounds``, or a one-element placeholder where the kernels do not read it (DOC off)."""
    return bounds if bounds is not None else torch.zeros(1, dtype=torch.int32, device=like.device)
