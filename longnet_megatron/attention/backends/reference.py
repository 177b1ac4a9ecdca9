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
    """Chunked key windows of a variable-length batch: chunk i's queries and the keys they may see.

    Rows are padded with one empty chunk in front and zeros at the end, so chunk i's window is the
    padded chunks i .. i + 1 (causal) or i .. i + 2, slices of one tensor.
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int, max_seqlen: int, causal: bool) -> None:
        self.total = total
        self.size = c = max(1, min(max_seqlen, total))
        self.chunks = -(-total // c)
        self.blocks = 2 if causal else 3  # chunks per key window
        run = torch.full(((self.chunks + 2) * c,), -1, dtype=torch.int64, device=cu_seqlens.device)
        run[c : c + total] = run_index(cu_seqlens, total)  # padding rows see only padding rows
        pos = torch.arange(run.numel(), device=run.device)
        every = slice(0, self.chunks)
        k_run, k_pos = self.window(run, every), self.window(pos, every)
        mask = self.queries(run)[:, :, None] == k_run[:, None, :]
        if causal:
            mask &= k_pos[:, None, :] <= self.queries(pos)[:, :, None]
        self.mask = mask  # [chunks, size, window]: query sees key

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[total, ...]`` in padded rows ``[(chunks + 2) * size, ...]``."""
        out = x.new_zeros(((self.chunks + 2) * self.size, *x.shape[1:]))
        out[self.size : self.size + self.total] = x
        return out

    def queries(self, xp: torch.Tensor, c: slice = slice(None)) -> torch.Tensor:
        """Padded rows of the queries of chunks ``c``, ``[g, size, ...]``."""
        start, stop, _ = c.indices(self.chunks)
        return xp[(start + 1) * self.size : (stop + 1) * self.size].unflatten(0, (stop - start, self.size))

    def window(self, xp: torch.Tensor, c: slice) -> torch.Tensor:
        """Padded rows of the key windows of chunks ``c``, ``[g, blocks * size, ...]``."""
        start, stop, _ = c.indices(self.chunks)
        parts = [xp[(start + j) * self.size : (stop + j) * self.size] for j in range(self.blocks)]
        return torch.cat([p.unflatten(0, (stop - start, self.size)) for p in parts], dim=1)

    def add_window(self, dst: torch.Tensor, value: torch.Tensor, c: slice) -> None:
        """Add key-window values ``[g, blocks * size, ...]`` of chunks ``c`` into padded rows ``dst``."""
        start, stop, _ = c.indices(self.chunks)
        for j in range(self.blocks):
            part = value[:, j * self.size : (j + 1) * self.size]
            dst[(start + j) * self.size : (stop + j) * self.size] += part.reshape(-1, *value.shape[2:])

    def unpad(self, xp: torch.Tensor) -> torch.Tensor:
        return xp[self.size : self.size + self.total]

    def groups(self, heads: int, max_scores: int) -> list[slice]:
        step = max(1, max_scores // max(1, self.size * self.blocks * self.size * heads))
        return [slice(i, min(i + step, self.chunks)) for i in range(0, self.chunks, step)]

    def scores(self, qp: torch.Tensor, kp: torch.Tensor, c: slice, scale: float) -> torch.Tensor:
        """``[g, heads, size, window]`` masked scores of chunks ``c`` (padded q and k)."""
        s = torch.einsum("gahd,gjhd->ghaj", self.queries(qp, c), self.window(kp, c)) * scale
        return s.masked_fill(~self.mask[c][:, None], float("-inf"))


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
        ct = _compute_dtype(q.dtype)
        band = _Band(cu_seqlens, q.shape[0], max_seqlen, causal)
        qp, kp, vp = (band.pad(t.to(ct)) for t in (q, k, v))
        out = torch.zeros_like(qp)
        lse = torch.zeros(qp.shape[:2], dtype=ct, device=q.device)
        for c in band.groups(q.shape[1], self.max_scores):
            s = band.scores(qp, kp, c, scale)
            lse_c = torch.logsumexp(s, dim=-1)  # [g, h, size]
            p = torch.exp(s - lse_c[..., None])
            band.queries(out, c).copy_(torch.einsum("ghaj,gjhd->gahd", p, band.window(vp, c)))
            band.queries(lse, c).copy_(lse_c.transpose(1, 2))
        return band.unpad(out).to(q.dtype), band.unpad(lse).t().contiguous()

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
        band = _Band(cu_seqlens, q.shape[0], max_seqlen, causal)
        qp, kp, vp, dop, op = (band.pad(t.to(ct)) for t in (q, k, v, dout, out))
        lsep = band.pad(lse.to(ct).t())  # [rows, h]; padding rows' 0 keeps exp finite
        deltap = (dop * op).sum(-1)
        dq, dk, dv = (torch.zeros_like(t) for t in (qp, kp, vp))
        for c in band.groups(q.shape[1], self.max_scores):
            s = band.scores(qp, kp, c, scale)
            p = torch.exp(s - band.queries(lsep, c).transpose(1, 2)[..., None])
            do_c = band.queries(dop, c)
            band.add_window(dv, torch.einsum("ghaj,gahd->gjhd", p, do_c), c)
            dp = torch.einsum("gahd,gjhd->ghaj", do_c, band.window(vp, c))
            ds = p * (dp - band.queries(deltap, c).transpose(1, 2)[..., None])
            band.queries(dq, c).copy_(torch.einsum("ghaj,gjhd->gahd", ds, band.window(kp, c)) * scale)
            band.add_window(dk, torch.einsum("ghaj,gahd->gjhd", ds, band.queries(qp, c)) * scale, c)
        return tuple(band.unpad(g).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))
