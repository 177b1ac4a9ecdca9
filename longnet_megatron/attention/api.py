"""The public dilated attention: a function in flash-attention's style, and an nn.Module around it."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .backends import AttentionBackend, get_backend
from .config import DilatedAttentionConfig
from .function import DilatedAttentionFunction
from .indexing import AttentionTask, plan_tasks


@lru_cache(maxsize=128)
def _cached_plan(
    config: DilatedAttentionConfig, n: int, hq: int, hkv: int, head_offset: int, position_offset: int
) -> tuple[AttentionTask, ...]:
    return tuple(plan_tasks(config, n, hq, hkv, head_offset=head_offset, position_offset=position_offset))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: DilatedAttentionConfig,
    *,
    head_offset: int = 0,
    position_offset: int = 0,
    backend: str | AttentionBackend = "auto",
    cp_group: torch.distributed.ProcessGroup | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact LongNet dilated attention.

    q: ``[B, N, Hq, D]``; k, v: ``[B, N, Hkv, D]`` with Hq a multiple of Hkv (query head h reads key
    head h // (Hq / Hkv)). ``head_offset`` is the global index of local head 0 (tensor parallelism) and
    ``position_offset`` the global position of local token 0; patterns are chosen by global index.
    ``cp_group`` of size > 1 runs LongNet's distributed algorithm over that group, q, k, v being this
    rank's contiguous chunk. ``backend`` is ``"auto"`` (the first of sdpa, te, reference that runs the
    inputs; the environment variable LONGNET_ATTENTION_BACKEND overrides it), a backend name
    (``available_backends()``) or a backend object. Returns ``[B, N, Hq, D]`` (and the float32
    log-sum-exp ``[B, N, Hq]`` with ``return_lse``).
    """
    _check_inputs(q, k, v)
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        from ..parallel.context_parallel import context_parallel_dilated_attention

        out, lse = context_parallel_dilated_attention(
            q,
            k,
            v,
            config,
            cp_group=cp_group,
            head_offset=head_offset,
            position_offset=position_offset,
            backend=backend,
        )
    else:
        impl = get_backend(backend, q)
        tasks = _cached_plan(config, q.shape[1], q.shape[2], k.shape[2], head_offset, position_offset)
        out, lse = DilatedAttentionFunction.apply(
            q, k, v, tasks, impl, config.causal, config.scale_for(q.shape[-1])
        )
    return (out, lse) if return_lse else out


class DilatedAttention(nn.Module):
    """``nn.Module`` form of :func:`dilated_attention` with a fixed configuration and backend."""

    def __init__(self, config: DilatedAttentionConfig, backend: str | AttentionBackend = "auto") -> None:
        super().__init__()
        self.config = config
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        head_offset: int = 0,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """See :func:`dilated_attention`."""
        return dilated_attention(
            q,
            k,
            v,
            self.config,
            head_offset=head_offset,
            position_offset=position_offset,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"patterns={self.config.patterns}, causal={self.config.causal}, backend={self.backend!r}"
