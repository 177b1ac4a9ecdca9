"""The kernel boundary: dense attention forward returning log-sum-exp, and its backward.

Modelled on flash-attention's interface: two plain functions per backend. Every tensor is
``[batch, length, heads, head_dim]`` with the same number of heads in q, k and v (the caller expands
grouped-query keys). ``causal`` means top-left aligned (query i sees keys j <= i) and is only asked for
with equal query and key lengths. The log-sum-exp is ``[batch, heads, length]``, float32 (float64 for float64
inputs).

``backward`` is given the MERGED output and log-sum-exp of all patterns (docs/design.md section 2): with
P = exp(S - L) it returns exactly this call's share of the gradients of the merged attention.

Document masking (docs/design.md section 7) needs a variable-length path as well
(:class:`VarlenBackend`, flash-attention's ``varlen`` interface): tensors ``[total, heads, head_dim]``
whose rows split into independent sequences at ``cu_seqlens`` (int32 ``[P + 1]``, first 0, last
total), each attending only itself (``causal``: query i of a sequence sees its keys j <= i);
``max_seqlen`` bounds a sequence's length. The log-sum-exp is then ``[heads, total]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class UnsupportedInputError(ValueError):
    """A backend cannot take these inputs (dtype, head size, device); the message says why."""


@runtime_checkable
class AttentionBackend(Protocol):
    """What a dilated-attention kernel provides."""

    name: str

    def check(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if ``q``'s dtype/shape/device is unsupported."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, lse)``: out like q, lse ``[b, h, l]`` in float32 (float64 for float64 q)."""

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
        """Return ``(dq, dk, dv)`` like q, k, v, given the merged ``out`` and ``lse``."""


@runtime_checkable
class VarlenBackend(Protocol):
    """A backend that also runs variable-length batches (document masking).

    ``varlen_cost``: the variable-length path's time per row relative to the dense kernel's (measured,
    benchmarks/attention.md); above 1, whole-document segments keep the dense kernel.
    """

    name: str
    varlen_cost: float

    def check_varlen(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if the variable-length path cannot take ``q``."""

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
        """Return ``(out, lse)``: out ``[T, H, D]`` like q, lse ``[H, T]`` float32 (float64 for float64 q)."""

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
        """Return ``(dq, dk, dv)`` ``[T, H, D]`` given the merged ``out`` and ``lse`` ``[H, T]``."""


def run_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int64: the sequence of a variable-length batch that each of its rows belongs to."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, rows, right=True).to(torch.int64) - 1


def run_bounds(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[total]`` each: every row's sequence as ``[first row, row after its last)``."""
    index = run_index(cu_seqlens, total)
    return cu_seqlens[index], cu_seqlens[index + 1]
