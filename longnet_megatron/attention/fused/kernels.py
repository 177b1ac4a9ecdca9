"""Fused dilated attention in Triton: every pattern of a query tile folded into ONE online softmax.

Nothing is gathered. A program owns a tile of consecutive query rows of one head and keeps one running
softmax state (acc, m, l) for it. For each pattern (w, r) and each segment the tile touches, the rows
of the tile that the pattern selects are an arithmetic progression of step r; they are loaded straight
from q with strided addressing as a sub-tile of ``cdiv(tile, r)`` rows, their keys (step r from the
segment's first selected key) are streamed from k and v the same way, and the sub-tile's (O_i, L_i)
is folded into the tile's state in registers: a one-hot [tile, sub-tile] product places each sub-row
on its tile row (computed as two bf16 products, hi and lo, so the placement is exact to ~2^-16
relative). r = 1 patterns work on the tile itself. The multiset-union softmax of docs/design.md section 1
is what comes out; no per-pattern buffer or merge pass exists.

Backward (docs/design.md section 2, the same math as every other backend): ``delta = rowsum(dO * O)`` of
the merged output, then one kernel owns a query tile and accumulates dq over all patterns, and one
owns a key tile of one key/value head and accumulates dk, dv over all patterns and all query heads of
its group (GQA in the kernel). Every output element is written once: no atomics, no float32 buffers
the size of q.

Positions and heads are GLOBAL: ``POS_OFF`` is the global position of local row 0 (context
parallelism), ``HEAD_OFF`` the global index of local head 0 (tensor parallelism). Optional document
masking takes per-row ``[doc_start, doc_end)`` global bounds: a query sees a key only inside its own
document, and key ranges outside the tile's documents are skipped, not masked.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tests) miscomputes bf16 dots; there the placement uses an exact fp32 dot.
_EXACT_PLACE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _first_selected(lo, seg_start, offset, R: tl.constexpr):
    """The first position >= lo whose offset from ``seg_start`` is ``offset`` modulo R."""
    return lo + (offset - (lo - seg_start) % R + R) % R


@triton.jit
def _place(vals, sub_rows, sub_ok, tile0, TILE: tl.constexpr):
    """Rows of ``vals`` [S, D] moved onto a [TILE, D] tile (row ``sub_rows - tile0``), zeros elsewhere.

    A one-hot matrix product, split into bf16 hi and lo parts so the tensor cores place float32 values
    to about 2^-16 relative error.
    """
    onehot = (tl.arange(0, TILE)[:, None] == (sub_rows - tile0)[None, :]) & sub_ok[None, :]
    if _EXACT_PLACE:
        return tl.dot(onehot.to(tl.float32), vals, input_precision="ieee")
    onehot = onehot.to(tl.bfloat16)
    hi = vals.to(tl.bfloat16)
    lo = (vals - hi.to(tl.float32)).to(tl.bfloat16)
    return tl.dot(onehot, hi) + tl.dot(onehot, lo)


@triton.jit
def _place_rows(vec, sub_rows, sub_ok, tile0, fill, TILE: tl.constexpr):
    """A per-row vector of a sub-tile placed on tile rows (``fill`` where no sub-row lands)."""
    hit = (tl.arange(0, TILE)[:, None] == (sub_rows - tile0)[None, :]) & sub_ok[None, :]
    return tl.max(tl.where(hit, vec[None, :], fill), 1)


@triton.jit
def _key_block(
    K, V, skl, svl, kk, hi, kfirst, POS_OFF, R: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr
):  # fmt: skip
    """k, v rows at global positions ``kfirst + R * kk`` (zeros for kk >= hi when MASKED), the positions,
    and which of them lie below ``hi``."""
    kpos = kfirst + kk * R
    local = (kpos - POS_OFF).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = kk < hi
    if MASKED:
        k = tl.load(K + local[:, None] * skl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + local[:, None] * svl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(K + local[:, None] * skl + offs_d[None, :])
        v = tl.load(V + local[:, None] * svl + offs_d[None, :])
    return k, v, kpos, col_ok


@triton.jit
def _visible(rows, row_ok, row_ds, row_de, kpos, col_ok, CAUSAL: tl.constexpr, DOC: tl.constexpr):
    """[rows, keys]: query row sees key (both in range, causal order, same document)."""
    valid = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (kpos[None, :] <= rows[:, None])
    if DOC:
        valid = valid & (kpos[None, :] >= row_ds[:, None]) & (kpos[None, :] < row_de[:, None])
    return valid


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_keys(
    acc, m_i, l_i, q, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF, lo, hi, qk_scale,
    R: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """Online softmax of query rows ``q`` over keys ``kfirst + R * kk`` for kk in [lo, hi)."""
    offs_n = tl.arange(0, BN)
    for kk0 in range(lo, hi, BN):
        k, v, kpos, col_ok = _key_block(
            K, V, skl, svl, kk0 + offs_n, hi, kfirst, POS_OFF, R, HEAD_DIM, MASKED
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            valid = _visible(rows, row_ok, row_ds, row_de, kpos, col_ok, CAUSAL, DOC)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _doc_span(ds, de, ok):
    """(earliest start, latest end, whether every valid row lies in one document) of a block's rows."""
    ds_min = tl.min(tl.where(ok, ds, 2147483647), 0)
    de_max = tl.max(tl.where(ok, de, 0), 0)
    one = (tl.max(tl.where(ok, ds, ds_min), 0) == ds_min) & (tl.min(tl.where(ok, de, de_max), 0) == de_max)
    return ds_min, de_max, one


@triton.jit
def _key_range(
    row_lo, row_hi, kfirst, nk, ds_min, de_max, one_doc, R: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """Key indices [lo, hi) that rows [row_lo, row_hi] can see, and the end of the mask-free part.

    With documents, keys before the rows' earliest document start or past their latest end are
    skipped; when all rows share one document, the blocks inside it need no mask either.
    """
    hi = nk
    full = nk
    if CAUSAL:
        hi = tl.minimum(nk, (row_hi - kfirst) // R + 1)
        full = tl.minimum(hi, (row_lo - kfirst) // R + 1)
    lo = hi * 0
    if DOC:
        gap = ds_min - kfirst
        lo = tl.where(gap > 0, (gap + R - 1) // R, 0)
        end = de_max - kfirst
        hi = tl.minimum(hi, tl.where(end > 0, (end + R - 1) // R, 0))
        full = tl.where(one_doc, tl.minimum(full, hi), lo)
    full = lo + ((tl.maximum(full, lo) - lo) // BN) * BN
    return lo, hi, full


@triton.jit
def _segment_block(
    T0, T1, seg, offset, POS_OFF, N, W: tl.constexpr, R: tl.constexpr, TILE: tl.constexpr,
    SUB: tl.constexpr,
):  # fmt: skip
    """Rows of tile [T0, T1) that pattern (W, R) selects in segment ``seg``, and the other side's range.

    Returns (rows, row_ok, first, last, end, whole, other_first, n_other): for R = 1 the tile's own rows
    (``whole``: all of them lie in the segment), else a sub-tile of SUB rows at step R from ``first``,
    all below ``end`` (none when first >= end);
    the partner rows (keys of query rows, or queries of key rows) are ``other_first + R * i`` for
    i < n_other, all in the segment (clipped to the local sequence).
    """
    seg0 = seg * W
    s0 = tl.maximum(seg0, POS_OFF)
    s1 = tl.minimum(seg0 + W, POS_OFF + N)
    lo = tl.maximum(T0, s0)
    hi = tl.minimum(T1, s1)
    other_first = _first_selected(s0, seg0, offset, R)
    n_other = tl.maximum(s1 - other_first + R - 1, 0) // R
    if R == 1:
        rows = T0 + tl.arange(0, TILE)
        row_ok = (rows >= lo) & (rows < hi)
        first = lo
        last = hi - 1
        whole = (lo == T0) & (hi == T1)
    else:
        first = _first_selected(lo, seg0, offset, R)
        rows = first + R * tl.arange(0, SUB)
        row_ok = rows < hi
        last = first + R * ((hi - 1 - first) // R)
        whole = first < hi
    return rows, row_ok, first, last, hi, whole, other_first, n_other


@triton.jit
def _fwd_pattern(
    acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl,
    T0, T1, hg, POS_OFF, N, qk_scale,
    W: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """Fold pattern (W, R) into the tile state of query rows [T0, T1) (global positions)."""
    offset = hg % R
    offs_d = tl.arange(0, HEAD_DIM)
    for seg in range(T0 // W, (T1 - 1) // W + 1):
        rows, row_ok, first, last, hi, whole, kfirst, nk = _segment_block(
            T0, T1, seg, offset, POS_OFF, N, W, R, BM, SUB
        )
        q = tl.load(
            Q + (rows - POS_OFF).to(tl.int64)[:, None] * sql + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        row_ds = rows
        row_de = rows
        ds_min = first
        de_max = last
        one_doc = first < hi
        if DOC:
            local = (rows - POS_OFF).to(tl.int64) * sdl
            row_ds = tl.load(DS + local, mask=row_ok, other=0)
            row_de = tl.load(DE + local, mask=row_ok, other=0)
            ds_min, de_max, one_doc = _doc_span(row_ds, row_de, row_ok)
        klo, khi, kfull = _key_range(first, last, kfirst, nk, ds_min, de_max, one_doc, R, BN, CAUSAL, DOC)
        if not whole:
            kfull = klo
        if first < hi:
            if R == 1:
                acc, m_i, l_i = _fwd_keys(
                    acc, m_i, l_i, q, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    klo, kfull, qk_scale, R, BN, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                acc, m_i, l_i = _fwd_keys(
                    acc, m_i, l_i, q, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    kfull, khi, qk_scale, R, BN, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
            else:
                sub_acc = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
                sub_m = tl.full([SUB], float("-inf"), dtype=tl.float32)
                sub_l = tl.zeros([SUB], dtype=tl.float32)
                sub_acc, sub_m, sub_l = _fwd_keys(
                    sub_acc, sub_m, sub_l, q, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst,
                    POS_OFF, klo, kfull, qk_scale, R, BN, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                sub_acc, sub_m, sub_l = _fwd_keys(
                    sub_acc, sub_m, sub_l, q, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst,
                    POS_OFF, kfull, khi, qk_scale, R, BN, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
                seen = sub_l > 0
                sub_out = sub_acc / tl.where(seen, sub_l, 1.0)[:, None]
                sub_lse = tl.where(seen, sub_m + tl.math.log2(tl.where(seen, sub_l, 1.0)), float("-inf"))
                placed = _place(sub_out, rows, row_ok, T0, BM)
                lse_t = _place_rows(sub_lse, rows, row_ok, T0, float("-inf"), BM)
                m_new = tl.maximum(m_i, lse_t)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_safe)
                beta = tl.math.exp2(lse_t - m_safe)
                acc = acc * alpha[:, None] + placed * beta[:, None]
                l_i = l_i * alpha + beta
                m_i = m_new
    return acc, m_i, l_i


# The kernels take up to 8 patterns as constexpr (W_i, R_i, SUB_i) triples: each pattern's loops are
# specialised (strides, sub-tile size) and unused ones vanish at compile time.
@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, DS, DE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, slb, sll, slh, sdb, sdl,
    N, H, GROUP, HEAD_OFF, POS_OFF, qk_scale,
    W0: tl.constexpr, R0: tl.constexpr, S0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, S1: tl.constexpr,
    W2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr, W3: tl.constexpr, R3: tl.constexpr, S3: tl.constexpr,
    W4: tl.constexpr, R4: tl.constexpr, S4: tl.constexpr, W5: tl.constexpr, R5: tl.constexpr, S5: tl.constexpr,
    W6: tl.constexpr, R6: tl.constexpr, S6: tl.constexpr, W7: tl.constexpr, R7: tl.constexpr, S7: tl.constexpr,
    NPAT: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Output and log-sum-exp of one query tile of one head over all patterns."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hg = h + HEAD_OFF
    hk = (h // GROUP).to(tl.int64)
    Q += b * sqb + h.to(tl.int64) * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    DS += b * sdb
    DE += b * sdb
    T0 = POS_OFF + pid * BM
    T1 = tl.minimum(T0 + BM, POS_OFF + N)

    acc = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if NPAT > 0:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W0, R0, BM, BN, S0, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 1:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W1, R1, BM, BN, S1, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 2:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W2, R2, BM, BN, S2, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 3:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W3, R3, BM, BN, S3, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 4:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W4, R4, BM, BN, S4, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 5:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W5, R5, BM, BN, S5, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 6:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W6, R6, BM, BN, S6, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 7:
        acc, m_i, l_i = _fwd_pattern(acc, m_i, l_i, Q, K, V, DS, DE, sql, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W7, R7, BM, BN, S7, HEAD_DIM, CAUSAL, DOC)  # fmt: skip

    rows = T0 + tl.arange(0, BM)
    row_ok = rows < T1
    local = (rows - POS_OFF).to(tl.int64)
    out = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    offs_d = tl.arange(0, HEAD_DIM)
    OUT += b * sob + h.to(tl.int64) * soh
    tl.store(OUT + local[:, None] * sol + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * slb + h.to(tl.int64) * slh + local * sll, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward: dq per query tile
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dq_keys(
    dq, q, do, lse2, delta, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF, lo, hi,
    qk_scale, R: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """dq of query rows over keys ``kfirst + R * kk`` for kk in [lo, hi), with the merged lse."""
    offs_n = tl.arange(0, BN)
    for kk0 in range(lo, hi, BN):
        k, v, kpos, col_ok = _key_block(
            K, V, skl, svl, kk0 + offs_n, hi, kfirst, POS_OFF, R, HEAD_DIM, MASKED
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            valid = _visible(rows, row_ok, row_ds, row_de, kpos, col_ok, CAUSAL, DOC)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_pattern(
    dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl,
    T0, T1, hg, POS_OFF, N, qk_scale,
    W: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """Add pattern (W, R)'s part of dq for query rows [T0, T1)."""
    offset = hg % R
    offs_d = tl.arange(0, HEAD_DIM)
    for seg in range(T0 // W, (T1 - 1) // W + 1):
        rows, row_ok, first, last, hi, whole, kfirst, nk = _segment_block(
            T0, T1, seg, offset, POS_OFF, N, W, R, BM, SUB
        )
        local = (rows - POS_OFF).to(tl.int64)
        q = tl.load(Q + local[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + local[:, None] * sdol + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + local * sll, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + local * sdel, mask=row_ok, other=0.0)
        row_ds = rows
        row_de = rows
        ds_min = first
        de_max = last
        one_doc = first < hi
        if DOC:
            row_ds = tl.load(DS + local * sdl, mask=row_ok, other=0)
            row_de = tl.load(DE + local * sdl, mask=row_ok, other=0)
            ds_min, de_max, one_doc = _doc_span(row_ds, row_de, row_ok)
        klo, khi, kfull = _key_range(first, last, kfirst, nk, ds_min, de_max, one_doc, R, BN, CAUSAL, DOC)
        if not whole:
            kfull = klo
        if first < hi:
            if R == 1:
                dq = _dq_keys(
                    dq, q, do, lse2, delta, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    klo, kfull, qk_scale, R, BN, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                dq = _dq_keys(
                    dq, q, do, lse2, delta, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    kfull, khi, qk_scale, R, BN, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
            else:
                sub = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
                sub = _dq_keys(
                    sub, q, do, lse2, delta, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    klo, kfull, qk_scale, R, BN, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                sub = _dq_keys(
                    sub, q, do, lse2, delta, rows, row_ok, row_ds, row_de, K, V, skl, svl, kfirst, POS_OFF,
                    kfull, khi, qk_scale, R, BN, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
                dq += _place(sub, rows, row_ok, T0, BM)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, DE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdob, sdol, sdoh, slb, sll, slh,
    sdeb, sdel, sdeh, sdqb, sdql, sdqh, sdb, sdl,
    N, H, GROUP, HEAD_OFF, POS_OFF, qk_scale, scale,
    W0: tl.constexpr, R0: tl.constexpr, S0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, S1: tl.constexpr,
    W2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr, W3: tl.constexpr, R3: tl.constexpr, S3: tl.constexpr,
    W4: tl.constexpr, R4: tl.constexpr, S4: tl.constexpr, W5: tl.constexpr, R5: tl.constexpr, S5: tl.constexpr,
    W6: tl.constexpr, R6: tl.constexpr, S6: tl.constexpr, W7: tl.constexpr, R7: tl.constexpr, S7: tl.constexpr,
    NPAT: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dq of one query tile of one head over all patterns."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hg = h + HEAD_OFF
    h64 = h.to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    Q += b * sqb + h64 * sqh
    DO += b * sdob + h64 * sdoh
    LSE += b * slb + h64 * slh
    DELTA += b * sdeb + h64 * sdeh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    DS += b * sdb
    DE += b * sdb
    T0 = POS_OFF + pid * BM
    T1 = tl.minimum(T0 + BM, POS_OFF + N)
    dq = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
    if NPAT > 0:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W0, R0, BM, BN, S0, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 1:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W1, R1, BM, BN, S1, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 2:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W2, R2, BM, BN, S2, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 3:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W3, R3, BM, BN, S3, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 4:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W4, R4, BM, BN, S4, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 5:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W5, R5, BM, BN, S5, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 6:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W6, R6, BM, BN, S6, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    if NPAT > 7:
        dq = _dq_pattern(dq, Q, DO, LSE, DELTA, K, V, DS, DE, sql, sdol, sll, sdel, skl, svl, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W7, R7, BM, BN, S7, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    rows = T0 + tl.arange(0, BM)
    local = (rows - POS_OFF).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    DQ += b * sdqb + h64 * sdqh
    tl.store(
        DQ + local[:, None] * sdql + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=(rows < T1)[:, None],
    )


# --------------------------------------------------------------------------------------------------
# backward: dk, dv per key tile of one key/value head (all query heads of its group)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_queries(
    dk, dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll, sdel,
    qfirst, POS_OFF, lo, hi, qhi, qk_scale, R: tl.constexpr, BMQ: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """dk, dv of key rows over queries ``qfirst + R * ii`` for ii in [lo, hi) (valid below ``qhi``)."""
    offs_m = tl.arange(0, BMQ)
    offs_d = tl.arange(0, HEAD_DIM)
    for ii0 in range(lo, hi, BMQ):
        ii = ii0 + offs_m
        qpos = qfirst + ii * R
        local = (qpos - POS_OFF).to(tl.int64)
        if MASKED:
            q_ok = ii < qhi
            q = tl.load(Q + local[:, None] * sql + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            do = tl.load(DO + local[:, None] * sdol + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + local * sll, mask=q_ok, other=float("inf")) * _LOG2E
            delta = tl.load(DELTA + local * sdel, mask=q_ok, other=0.0)
        else:
            q = tl.load(Q + local[:, None] * sql + offs_d[None, :])
            do = tl.load(DO + local[:, None] * sdol + offs_d[None, :])
            lse2 = tl.load(LSE + local * sll) * _LOG2E
            delta = tl.load(DELTA + local * sdel)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            valid = key_ok[:, None] & q_ok[None, :]
            if CAUSAL:
                valid = valid & (qpos[None, :] >= keys[:, None])
            if DOC:
                valid = valid & (qpos[None, :] >= key_ds[:, None]) & (qpos[None, :] < key_de[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        elif R > 1:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)  # sub-tile rows past the segment hold zeros
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_pattern(
    dk, dv, k_tile, v_tile, K, V, Q, DO, LSE, DELTA, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl,
    T0, T1, hg, POS_OFF, N, qk_scale,
    W: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BMQ: tl.constexpr, SUB: tl.constexpr,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
):  # fmt: skip
    """Add pattern (W, R)'s part of dk, dv for key rows [T0, T1) from query head ``hg``."""
    offset = hg % R
    offs_d = tl.arange(0, HEAD_DIM)
    for seg in range(T0 // W, (T1 - 1) // W + 1):
        keys, key_ok, first, last, hi, whole, qfirst, nq = _segment_block(
            T0, T1, seg, offset, POS_OFF, N, W, R, BN, SUB
        )
        if R == 1:
            k = k_tile
            v = v_tile
        else:
            local = (keys - POS_OFF).to(tl.int64)
            k = tl.load(K + local[:, None] * skl + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(V + local[:, None] * svl + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        key_ds = keys
        key_de = keys
        qlo = nq * 0
        if CAUSAL:
            qlo = (first - qfirst) // R
        qhi = nq
        one_doc = first < hi
        if DOC:
            # queries outside the keys' documents are skipped; inside one shared document, unmasked
            local = (keys - POS_OFF).to(tl.int64) * sdl
            key_ds = tl.load(DS + local, mask=key_ok, other=0)
            key_de = tl.load(DE + local, mask=key_ok, other=0)
            ds_min, de_max, one_doc = _doc_span(key_ds, key_de, key_ok)
            gap = ds_min - qfirst
            qlo = tl.maximum(qlo, tl.where(gap > 0, (gap + R - 1) // R, 0))
            end = de_max - qfirst
            qhi = tl.minimum(qhi, tl.where(end > 0, (end + R - 1) // R, 0))
        # masked [qlo, m_end) around the diagonal, mask-free [m_end, u_end), masked tail [u_end, qhi)
        m_end = qlo
        if CAUSAL:
            diag = (last - qfirst) // R + 1
            m_end = tl.maximum(qlo, tl.minimum(qhi, qlo + ((diag - qlo + BMQ - 1) // BMQ) * BMQ))
        u_end = m_end + ((tl.maximum(qhi - m_end, 0)) // BMQ) * BMQ
        if not one_doc:
            m_end = qhi
            u_end = qhi
        if not whole:
            m_end = qhi
            u_end = qhi
        if first < hi:
            if R == 1:
                dk, dv = _dkdv_queries(
                    dk, dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll, sdel,
                    qfirst, POS_OFF, qlo, m_end, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
                dk, dv = _dkdv_queries(
                    dk, dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll, sdel,
                    qfirst, POS_OFF, m_end, u_end, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                dk, dv = _dkdv_queries(
                    dk, dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll, sdel,
                    qfirst, POS_OFF, u_end, qhi, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
            else:
                sub_dk = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
                sub_dv = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
                sub_dk, sub_dv = _dkdv_queries(
                    sub_dk, sub_dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll,
                    sdel, qfirst, POS_OFF, qlo, m_end, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
                sub_dk, sub_dv = _dkdv_queries(
                    sub_dk, sub_dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll,
                    sdel, qfirst, POS_OFF, m_end, u_end, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, False, DOC,
                )  # fmt: skip
                sub_dk, sub_dv = _dkdv_queries(
                    sub_dk, sub_dv, k, v, keys, key_ok, key_ds, key_de, Q, DO, LSE, DELTA, sql, sdol, sll,
                    sdel, qfirst, POS_OFF, u_end, qhi, qhi, qk_scale, R, BMQ, HEAD_DIM, CAUSAL, True, DOC,
                )  # fmt: skip
                dk += _place(sub_dk, keys, key_ok, T0, BN)
                dv += _place(sub_dv, keys, key_ok, T0, BN)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DS, DE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdob, sdol, sdoh, slb, sll, slh,
    sdeb, sdel, sdeh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh, sdb, sdl,
    N, HK, GROUP, HEAD_OFF, POS_OFF, qk_scale, scale,
    W0: tl.constexpr, R0: tl.constexpr, S0: tl.constexpr, W1: tl.constexpr, R1: tl.constexpr, S1: tl.constexpr,
    W2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr, W3: tl.constexpr, R3: tl.constexpr, S3: tl.constexpr,
    W4: tl.constexpr, R4: tl.constexpr, S4: tl.constexpr, W5: tl.constexpr, R5: tl.constexpr, S5: tl.constexpr,
    W6: tl.constexpr, R6: tl.constexpr, S6: tl.constexpr, W7: tl.constexpr, R7: tl.constexpr, S7: tl.constexpr,
    NPAT: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
    BN: tl.constexpr, BMQ: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile of one key/value head, over all patterns and its query heads."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HK).to(tl.int64)
    hk = bh % HK
    hk64 = hk.to(tl.int64)
    K += b * skb + hk64 * skh
    V += b * svb + hk64 * svh
    DS += b * sdb
    DE += b * sdb
    T0 = POS_OFF + pid * BN
    T1 = tl.minimum(T0 + BN, POS_OFF + N)
    keys = T0 + tl.arange(0, BN)
    local = (keys - POS_OFF).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    tile_ok = keys < T1
    k_tile = tl.load(K + local[:, None] * skl + offs_d[None, :], mask=tile_ok[:, None], other=0.0)
    v_tile = tl.load(V + local[:, None] * svl + offs_d[None, :], mask=tile_ok[:, None], other=0.0)
    dk = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    for gi in range(0, GROUP):
        h64 = hk64 * GROUP + gi
        hg = hk * GROUP + gi + HEAD_OFF
        Qh = Q + b * sqb + h64 * sqh
        DOh = DO + b * sdob + h64 * sdoh
        LSEh = LSE + b * slb + h64 * slh
        DELTAh = DELTA + b * sdeb + h64 * sdeh
        if NPAT > 0:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W0, R0, BN, BMQ, S0, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 1:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W1, R1, BN, BMQ, S1, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 2:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W2, R2, BN, BMQ, S2, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 3:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W3, R3, BN, BMQ, S3, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 4:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W4, R4, BN, BMQ, S4, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 5:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W5, R5, BN, BMQ, S5, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 6:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W6, R6, BN, BMQ, S6, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
        if NPAT > 7:
            dk, dv = _dkdv_pattern(dk, dv, k_tile, v_tile, K, V, Qh, DOh, LSEh, DELTAh, DS, DE, skl, svl, sql, sdol, sll, sdel, sdl, T0, T1, hg, POS_OFF, N, qk_scale, W7, R7, BN, BMQ, S7, HEAD_DIM, CAUSAL, DOC)  # fmt: skip
    DK += b * sdkb + hk64 * sdkh
    DV += b * sdvb + hk64 * sdvh
    tl.store(
        DK + local[:, None] * sdkl + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=tile_ok[:, None],
    )
    tl.store(DV + local[:, None] * sdvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_ok[:, None])
