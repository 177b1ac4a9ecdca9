"""Dilated attention replayed from CUDA graphs: the host's launch time taken out of short sequences.

At N = 8K-16K one fwd+bwd is a few milliseconds of many small launches (gathers, several kernel calls,
the merge, the gradient adds), and an isolated call waits on the host (docs/attention.md). A graphed
instance captures the forward and the backward once per input signature with PyTorch's
``torch.cuda.make_graphed_callables`` and replays them: the same kernels on the same plan, so the
results are the eager function's (up to the kernels' own run-to-run rounding, e.g. atomic dq sums).

A graph's inputs, outputs and saved tensors live at fixed addresses, so one instance holds one call in
flight: its forward must be followed by that call's backward before it runs forward again (with
gradients on). The instance enforces this; use one per layer (and per micro-batch in flight). Outputs
are copied out of the graph's memory, so they stay valid after the next call. Calls without gradients
and CPU tensors run eagerly. Document masking (its layouts are found on the host from the ids) and
context parallelism are not offered here: use :func:`~.api.dilated_attention`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .api import dilated_attention
from .backends import AttentionBackend
from .config import DilatedAttentionConfig
from .packing import whole_plan_packing

Signature = tuple


class GraphedAttention(nn.Module):
    """Any attention function ``fn(q, k, v) -> out``, its CUDA calls with gradients replayed from graphs
    captured for each input signature (shape, dtype, device, which inputs need gradients); one call in
    flight (module docstring). Benchmarks graph dense attention through it too."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup_iters: int = 3) -> None:
        super().__init__()
        self.fn = fn
        self.warmup_iters = warmup_iters
        self.pack_whole_plan = True  # what the captured calls plan with (see GraphedDilatedAttention)
        self._graphs: dict[Signature, Callable[..., torch.Tensor]] = {}
        self._in_flight: weakref.ref | None = None  # the last graphed output still awaiting its backward
        self._pending = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``fn(q, k, v)``; graphed where q is on CUDA and a gradient is wanted."""
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if not (q.is_cuda and wants_grad):
            return self.fn(q, k, v)
        self._check_no_call_in_flight()
        signature = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in (q, k, v))
        graphed = self._graphs.get(signature)
        if graphed is None:
            graphed = self._graphs[signature] = self._capture(q, k, v)
        out = graphed(q, k, v).clone()  # the graph's output buffer is rewritten by the next replay
        self._pending = True
        self._in_flight = weakref.ref(out)
        out.register_hook(self._backward_arrived)
        return out

    def _backward_arrived(self, grad: torch.Tensor) -> None:
        self._pending = False
        self._in_flight = None

    def _check_no_call_in_flight(self) -> None:
        """Raise if the previous graphed call may still need its backward (its saved tensors would be
        overwritten); a call whose output is gone has no backward to wait for."""
        if not self._pending:
            return
        if self._in_flight is not None and self._in_flight() is None:
            self._pending = False
            return
        raise RuntimeError(
            "GraphedDilatedAttention: forward called again before the previous call's backward; a graphed "
            "instance holds one call in flight (its saved tensors live in the graph's memory). Use one "
            "instance per layer and micro-batch, or run the backward first."
        )

    def _capture(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[..., torch.Tensor]:
        """Graphs of ``fn``'s forward and backward on inputs like q, k, v (captured from copies)."""
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v))
        with whole_plan_packing(self.pack_whole_plan):  # warm-up and capture plan their calls here
            return torch.cuda.make_graphed_callables(
                self.fn, samples, num_warmup_iters=self.warmup_iters, allow_unused_input=True
            )


class GraphedDilatedAttention(GraphedAttention):
    """:func:`~.api.dilated_attention` with a fixed configuration, backend and offsets, graphed as
    :class:`GraphedAttention`."""

    def __init__(
        self,
        config: DilatedAttentionConfig,
        backend: str | AttentionBackend = "auto",
        *,
        head_offset: int = 0,
        position_offset: int = 0,
        warmup_iters: int = 3,
        pack_whole_plan: bool = False,
    ) -> None:
        """``pack_whole_plan``: whether captured calls pack a short plan whole (:mod:`.packing`). Off by
        default: packing saves launches, which a replay does not pay for, at the cost of gathers (H200,
        8K: 2.05 ms fwd+bwd unpacked against 3.57 packed; docs/attention.md)."""
        eager = partial(dilated_attention, config=config, backend=backend, head_offset=head_offset,
                        position_offset=position_offset)  # fmt: skip
        super().__init__(eager, warmup_iters=warmup_iters)
        self.pack_whole_plan = pack_whole_plan
        self.config = config
        self.backend = backend
        self.head_offset = head_offset
        self.position_offset = position_offset

    def extra_repr(self) -> str:
        return (
            f"patterns={self.config.patterns}, causal={self.config.causal}, backend={self.backend!r}, "
            f"graphs={len(self._graphs)}"
        )
