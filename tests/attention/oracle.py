"""The float64 O(N^2) oracle, written straight from docs/design.md section 1.

It shares no code with the implementation: for every query head it builds the multiplicity M[p, p'] of
(query, key) pairs over all patterns from the selection rule, and computes softmax(q k^T * scale +
log M) v. Gradients come from autograd through this plain computation.
"""

from __future__ import annotations

import math

import torch


def multiplicity(
    n: int,
    num_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    causal: bool,
    head_offset: int = 0,
    position_offset: int = 0,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[heads, n, n]`` count of patterns in which query p attends key p' (global positions and heads)."""
    pos = torch.arange(n, dtype=torch.long) + position_offset
    counts = torch.zeros(num_heads, n, n, dtype=torch.float64)
    for h in range(num_heads):
        global_head = head_offset + h
        for w, r in zip(segment_lengths, dilation_rates):
            offset = global_head % r
            selected = ((pos % w) % r) == offset
            same_segment = (pos[:, None] // w) == (pos[None, :] // w)
            allowed = selected[:, None] & selected[None, :] & same_segment
            if causal:
                allowed &= pos[None, :] <= pos[:, None]
            if document_ids is not None:
                allowed &= same_document(document_ids)
            counts[h] += allowed.double()
    return counts


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """``[n, n]``: both tokens lie in one document, a maximal run of equal ids (``[n]`` ids)."""
    starts = torch.ones_like(document_ids, dtype=torch.long)
    starts[1:] = (document_ids[1:] != document_ids[:-1]).long()
    run = torch.cumsum(starts, 0)
    return run[:, None] == run[None, :]


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    causal: bool,
    softmax_scale: float | None = None,
    head_offset: int = 0,
    position_offset: int = 0,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dilated attention of ``[B, N, H, D]`` float64 tensors (k, v may have fewer heads: GQA).

    ``document_ids`` ``[B, N]``: a query attends only keys of its own document (run of equal ids).
    """
    b, n, hq, d = q.shape
    group = hq // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if document_ids is None:
        m = multiplicity(n, hq, segment_lengths, dilation_rates, causal, head_offset, position_offset)[None]
    else:
        m = torch.stack(
            [
                multiplicity(
                    n, hq, segment_lengths, dilation_rates, causal, head_offset, position_offset, ids
                )
                for ids in document_ids.cpu()
            ]
        )
    m = m.to(q.device)
    bias = torch.where(m > 0, m.log(), torch.full_like(m, float("-inf")))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
