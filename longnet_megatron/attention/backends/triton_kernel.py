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

from .base import UnsupportedInputError

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
def _fwd_inner(
    acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, lo, hi, LK, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
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
            valid = kv_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sob, sol, soh,
    H, LQ, LK, qk_scale, NUM_M,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
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

    full_end = (LK // BLOCK_N) * BLOCK_N
    hi = LK
    if CAUSAL:
        full_end = (tl.minimum(LK, m0) // BLOCK_N) * BLOCK_N  # key blocks wholly below the diagonal
        hi = tl.minimum(LK, m0 + BLOCK_M)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, 0, full_end, LK, qk_scale,
        BLOCK_N, CAUSAL, False,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, skl, svl, offs_m, offs_n, offs_d, full_end, hi, LK, qk_scale,
        BLOCK_N, CAUSAL, True,
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
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
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
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sdb, sdl, sdh,
    slb, slh, sll,
    sdkb, sdkl, sdkh,
    sdvb, sdvl, sdvh,
    H, LQ, LK, qk_scale, scale, NUM_N,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
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

    if CAUSAL:
        # queries [n0, n0 + BLOCK_N) straddle the diagonal; later ones see the whole key block.
        diag_end = tl.minimum(n0 + BLOCK_N, LQ)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m, offs_d, n0, diag_end, LQ,
            qk_scale, BLOCK_M, CAUSAL, True,
        )  # fmt: skip
        lo = n0 + BLOCK_N
    else:
        lo = 0
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, sql, sdl, sll, offs_n, offs_m, offs_d, lo, LQ, LQ,
        qk_scale, BLOCK_M, CAUSAL, False,
    )  # fmt: skip
    dk = dk * scale
    tl.store(DK + offs_n[:, None] * sdkl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs_n[:, None] * sdvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n_base, offs_d, lo, hi, LK, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
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
            valid = kv_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sdb, sdl, sdh,
    slb, slh, sll,
    sdqb, sdql, sdqh,
    H, LQ, LK, qk_scale, scale, NUM_M,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
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

    full_end = (LK // BLOCK_N) * BLOCK_N
    hi = LK
    if CAUSAL:
        full_end = (tl.minimum(LK, m0) // BLOCK_N) * BLOCK_N  # key blocks wholly below the diagonal
        hi = tl.minimum(LK, m0 + BLOCK_M)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n, offs_d, 0, full_end, LK, qk_scale,
        BLOCK_N, CAUSAL, False,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K, V, skl, svl, offs_m, offs_n, offs_d, full_end, hi, LK, qk_scale,
        BLOCK_N, CAUSAL, True,
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
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            h, lq, lk, scale * _LOG2E, num_m,
            CAUSAL=causal, HEAD_DIM=d, **cfg,
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
        _bwd_dkdv_kernel[(num_n * b * h,)](
            q, k, v, dout, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            h, lq, lk, scale * _LOG2E, scale, num_n,
            CAUSAL=causal, HEAD_DIM=d, **cfg,
        )  # fmt: skip
        _bwd_dq_kernel[(num_m * b * h,)](
            q, k, v, dout, lse, delta, dq, *common,
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, lq, lk, scale * _LOG2E, scale, num_m,
            CAUSAL=causal, HEAD_DIM=d, **cfg,
        )  # fmt: skip
        return dq, dk, dv
