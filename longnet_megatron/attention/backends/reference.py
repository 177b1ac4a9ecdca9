"""Plain PyTorch attention with log-sum-exp: any device, any float dtype; the CPU path.

Half-precision inputs are computed in float32. Work is split over the batch so that the score matrix
of one chunk stays near ``max_scores`` elements, which bounds memory for long segments.

The variable-length path (document masking) cuts the rows into chunks of ``max_seqlen``: a sequence
then lies in at most two consecutive chunks, so each chunk's queries need only the keys of the chunk
before, their own chunk and (not causal) the chunk after, masked to their own sequence.
"""

from __future__ import annotations

import torch

from .base import UnsupportedInputError, run_index


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        lq, lk = s.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


class _Band:
    """Chunked key windows of a variable-length batch: chunk i's queries and the keys they may see."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, causal: bool) -> None:
        self.total = total
        self.size = size = max(1, min(max_seqlen, total))
        self.chunks = -(-total // size)
        width = (2 if causal else 3) * size
        device = cu_seqlens.device
        run = run_index(cu_seqlens, total)
        rows = torch.arange(self.chunks * size, device=device).view(self.chunks, size)
        keys = rows[:, :1] - size + torch.arange(width, device=device)  # [chunks, width]
        self.query_rows = rows.clamp(max=total - 1)  # rows past the end repeat the last (dropped)
        self.key_rows = keys.clamp(0, total - 1)
        mask = (keys >= 0) & (keys < total)
        mask = mask[:, None, :] & (run[self.query_rows][:, :, None] == run[self.key_rows][:, None, :])
        if causal:
            mask &= keys[:, None, :] <= rows[:, :, None]
        self.mask = mask  # [chunks, size, width]: query sees key

    def groups(self, heads: int, max_scores: int) -> list[slice]:
        step = max(1, max_scores // max(1, self.size * self.key_rows.shape[1] * heads))
        return [slice(i, i + step) for i in range(0, self.chunks, step)]

    def scores(self, q: torch.Tensor, k: torch.Tensor, c: slice, scale: float) -> torch.Tensor:
        """``[g, heads, size, width]`` masked scores of chunk group ``c``."""
        s = torch.einsum("gahd,gjhd->ghaj", q[self.query_rows[c]], k[self.key_rows[c]]) * scale
        return s.masked_fill(~self.mask[c][:, None], float("-inf"))

    def scatter(self, dst: torch.Tensor, value: torch.Tensor, c: slice, rows: torch.Tensor) -> None:
        """Add ``value`` ``[g, n, heads, dim]`` into the rows ``rows[c]`` of ``dst`` (duplicates summed)."""
        dst.index_add_(0, rows[c].reshape(-1), value.reshape(-1, *value.shape[2:]).to(dst.dtype))

    def valid(self, c: slice) -> torch.Tensor:
        """Which query slots of chunk group ``c`` are real rows (not the repeated last row)."""
        rows = torch.arange(self.chunks * self.size, device=self.mask.device).view(self.chunks, self.size)
        return rows[c] < self.total


class ReferenceBackend:
    """Exact dense attention in PyTorch operations (the oracle's twin, not its copy)."""

    name = "reference"
    varlen_cost = 2.0  # a chunk's queries score two (causal) or three chunks of keys

    def __init__(self, max_scores: int = 1 << 26) -> None:
        self.max_scores = max_scores

    def check(self, q: torch.Tensor) -> None:
        if not q.is_floating_point():
            raise UnsupportedInputError(f"reference backend needs a floating-point dtype, got {q.dtype}")

    def _chunks(self, q: torch.Tensor, k: torch.Tensor) -> list[slice]:
        per_item = max(1, q.shape[1] * k.shape[1] * q.shape[2])
        step = max(1, self.max_scores // per_item)
        return [slice(i, i + step) for i in range(0, q.shape[0], step)]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ct = _compute_dtype(q.dtype)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=ct, device=q.device)
        for c in self._chunks(q, k):
            qc, kc, vc = q[c].to(ct), k[c].to(ct), v[c].to(ct)
            s = _scores(qc, kc, causal, scale)
            lse_c = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse_c[..., None])
            out[c] = torch.einsum("bhqk,bkhd->bqhd", p, vc).to(q.dtype)
            lse[c] = lse_c
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
        ct = _compute_dtype(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for c in self._chunks(q, k):
            qc, kc, vc = q[c].to(ct), k[c].to(ct), v[c].to(ct)
            doc, oc = dout[c].to(ct), out[c].to(ct)
            p = torch.exp(_scores(qc, kc, causal, scale) - lse[c].to(ct)[..., None])
            dv[c] = torch.einsum("bhqk,bqhd->bkhd", p, doc).to(v.dtype)
            dp = torch.einsum("bqhd,bkhd->bhqk", doc, vc)
            delta = (doc * oc).sum(-1).transpose(1, 2)  # [b, h, q]
            ds = p * (dp - delta[..., None])
            dq[c] = (torch.einsum("bhqk,bkhd->bqhd", ds, kc) * scale).to(q.dtype)
            dk[c] = (torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale).to(k.dtype)
        return dq, dk, dv

    # -- variable-length batches (document masking) ---------------------------------------------
    def check_varlen(self, q: torch.Tensor) -> None:
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
        ct, dtype = _compute_dtype(q.dtype), q.dtype
        total, h, _ = q.shape
        band = _Band(cu_seqlens, total, max_seqlen, causal)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        out = torch.zeros(q.shape, dtype=ct, device=q.device)
        lse = torch.zeros(total, h, dtype=ct, device=q.device)
        for c in band.groups(h, self.max_scores):
            s = band.scores(q, k, c, scale)
            lse_c = torch.logsumexp(s, dim=-1)  # [g, h, size]
            p = torch.exp(s - lse_c[..., None])
            o = torch.einsum("ghaj,gjhd->gahd", p, v[band.key_rows[c]])
            keep = band.valid(c)[..., None]
            band.scatter(out, o * keep[..., None], c, band.query_rows)
            band.scatter(lse, lse_c.transpose(1, 2) * keep, c, band.query_rows)
        return out.to(dtype), lse.t().contiguous()

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
        ct = _compute_dtype(q.dtype)
        total, h, _ = q.shape
        band = _Band(cu_seqlens, total, max_seqlen, causal)
        qc, kc, vc, doc, oc = (t.to(ct) for t in (q, k, v, dout, out))
        lse_rows = lse.to(ct).t()  # [total, h]
        delta = (doc * oc).sum(-1)  # [total, h]
        dq, dk, dv = (torch.zeros(t.shape, dtype=ct, device=q.device) for t in (q, k, v))
        for c in band.groups(h, self.max_scores):
            rows = band.query_rows[c]
            keep = band.valid(c)  # [g, size]
            s = band.scores(qc, kc, c, scale)
            p = torch.exp(s - lse_rows[rows].transpose(1, 2)[..., None]) * keep[:, None, :, None]
            do_c = doc[rows]
            band.scatter(dv, torch.einsum("ghaj,gahd->gjhd", p, do_c), c, band.key_rows)
            dp = torch.einsum("gahd,gjhd->ghaj", do_c, vc[band.key_rows[c]])
            ds = p * (dp - delta[rows].transpose(1, 2)[..., None])
            band.scatter(
                dq, torch.einsum("ghaj,gjhd->gahd", ds, kc[band.key_rows[c]]) * scale, c, band.query_rows
            )
            band.scatter(dk, torch.einsum("ghaj,gahd->gjhd", ds, qc[rows]) * scale, c, band.key_rows)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
