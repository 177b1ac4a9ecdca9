"""Plain PyTorch attention with log-sum-exp: any device, any float dtype; the CPU path.

Half-precision inputs are computed in float32. Work is split over the batch so that the score matrix
of one chunk stays near ``max_scores`` elements, which bounds memory for long segments.
"""

from __future__ import annotations

import torch

from .base import UnsupportedInputError


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        lq, lk = s.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


class ReferenceBackend:
    """Exact dense attention in PyTorch operations (the oracle's twin, not its copy)."""

    name = "reference"

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
