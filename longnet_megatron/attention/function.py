"""Exact dilated attention over any backend: per-pattern calls, the log-sum-exp merge, the exact backward.

Forward (DESIGN.md section 1): every task (one pattern, one head offset, one block of equal-length
segments) is a dense attention call returning (O_i, L_i); results are merged online,
L = logaddexp(L, L_i), O = O * exp(L_old - L) + O_i * exp(L_i - L), into one accumulator, so no
per-pattern full-size buffer exists.

Backward (DESIGN.md section 2): each task's kernel backward runs on the gathered q, k, v with the
MERGED O and L, and its dq, dk, dv are scatter-added. With P_i = exp(S_i - L) these are exactly the
gradients of the merged attention; nothing is differentiated through the merge weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backends.base import AttentionBackend
from .indexing import AttentionTask, Selection


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dilated_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tasks: Sequence[AttentionTask],
    backend: AttentionBackend,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``[B, N, Hq, D]`` (q's dtype) and log-sum-exp ``[B, N, Hq]`` (float32/64)."""
    out, lse = new_accumulators(q)
    for task in tasks:
        sel, kv = task.query, task.key_value
        o_i, l_i = backend.forward(sel.gather(q), kv.gather(k), kv.gather(v), causal=causal, scale=scale)
        merge_partial(out, lse, sel, o_i, l_i)
        del o_i, l_i
    return out.to(q.dtype), lse


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty merge state for q: output zeros ``[B, N, H, D]`` and log-sum-exp -inf ``[B, N, H]``."""
    acc = _accumulator_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    return out, lse


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, sel: Selection, o_i: torch.Tensor, l_i: torch.Tensor
) -> None:
    """Fold one call's (O_i, L_i) (``[b, l, h, d]``, ``[b, h, l]``) into the selected part of (out, lse).

    L = logaddexp(L, L_i); O = O * exp(L_old - L) + O_i * exp(L_i - L): the exact softmax-denominator
    weighting of DESIGN.md section 1, applied online so no per-pattern buffer is kept.
    """
    l_i = l_i.transpose(1, 2).to(lse.dtype)
    l_old = sel.gather(lse)
    l_new = torch.logaddexp(l_old, l_i)
    merged = sel.gather(out) * torch.exp(l_old - l_new)[..., None]
    merged += o_i.to(out.dtype) * torch.exp(l_i - l_new)[..., None]
    sel.put(out, merged)
    sel.put(lse, l_new)


def dilated_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tasks: Sequence[AttentionTask],
    backend: AttentionBackend,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (dq, dk, dv) of the merged attention, given its output and log-sum-exp."""
    acc = _accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    dout = dout.to(q.dtype)
    for task in tasks:
        sel, kv = task.query, task.key_value
        dq_i, dk_i, dv_i = backend.backward(
            sel.gather(dout),
            sel.gather(q),
            kv.gather(k),
            kv.gather(v),
            sel.gather(out),
            sel.gather(lse).transpose(1, 2),
            causal=causal,
            scale=scale,
        )
        sel.add(dq, dq_i.to(acc))
        kv.add(dk, dk_i.to(acc))
        kv.add(dv, dv_i.to(acc))
        del dq_i, dk_i, dv_i
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class DilatedAttentionFunction(torch.autograd.Function):
    """One autograd node for all patterns; saves q, k, v, O, L (no per-pattern copies)."""

    @staticmethod
    def forward(ctx, q, k, v, tasks, backend, causal, scale):  # noqa: D102
        out, lse = dilated_forward(q, k, v, tasks, backend, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tasks, ctx.backend, ctx.causal, ctx.scale = tasks, backend, causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = dilated_backward(
            dout, q, k, v, out, lse, ctx.tasks, ctx.backend, causal=ctx.causal, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None, None
