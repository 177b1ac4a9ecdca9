"""The kernel boundary: dense attention forward returning log-sum-exp, and its backward.

Modelled on flash-attention's interface: two plain functions per backend. Every tensor is
``[batch, length, heads, head_dim]`` with the same number of heads in q, k and v (the caller expands
grouped-query keys). ``causal`` means top-left aligned (query i sees keys j <= i) and is only asked for
with equal query and key lengths. The log-sum-exp is ``[batch, heads, length]``, float32 (float64 for float64
inputs).

``backward`` is given the MERGED output and log-sum-exp of all patterns (docs/design.md section 2): with
P = exp(S - L) it returns exactly this call's share of the gradients of the merged attention.
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
