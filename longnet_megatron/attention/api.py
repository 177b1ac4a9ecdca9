"""The public dilated attention: a function in flash-attention's style, and an nn.Module around it."""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch
from torch import nn

from .backends import (
    WHOLE_FUNCTION_BACKENDS,
    AttentionBackend,
    UnsupportedInputError,
    get_backend,
    resolve_name,
)
from .config import DilatedAttentionConfig
from .cp import context_parallel_dilated_attention
from .documents import Documents, document_bounds
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
    document_ids: torch.Tensor | Documents | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact LongNet dilated attention (docs/design.md section 1).

    q: ``[B, N, Hq, D]``; k, v: ``[B, N, Hkv, D]`` with Hq a multiple of Hkv (query head h reads key
    head h // (Hq / Hkv)). ``head_offset`` is the global index of local head 0 (tensor parallelism) and
    ``position_offset`` the global position of local token 0; patterns are chosen by global index.
    ``cp_group`` of size > 1 runs LongNet's distributed algorithm over that group (:mod:`.cp`), q, k, v
    being this rank's contiguous chunk. ``backend`` is a name of :func:`~.backends.backend_names` or a
    backend object: ``"auto"`` is the first per-call kernel of fa4, sdpa, te, triton (CUDA only), reference
    that accepts the inputs (``LONGNET_ATTENTION_BACKEND`` overrides it); ``"triton-fused"`` computes
    every pattern in one pass on one rank (:mod:`.fused`). ``document_ids`` ``[B, N]`` (a document is a
    run of equal ids; or a :class:`~.documents.Documents` made once per batch, which every layer then
    shares) masks attention across the documents of a packed sequence (docs/design.md section 7):
    every backend offers it, per-call kernels through their variable-length paths, and under context
    parallelism documents may cross rank boundaries. Returns ``[B, N, Hq, D]`` (and the float32
    log-sum-exp ``[B, N, Hq]`` with ``return_lse``).
    """
    _check_inputs(q, k, v)
    documents = _documents(document_ids, q)
    distributed = cp_group is not None and torch.distributed.get_world_size(cp_group) > 1
    fused = _whole_function_kernel(q, config, backend, distributed)
    if fused is not None:
        doc = (None, None)
        if documents is not None:
            doc = document_bounds(documents.ids, position_offset)
        out, lse = fused.FusedDilatedAttention.apply(
            q, k, v, config, config.scale_for(q.shape[-1]), head_offset, position_offset, *doc
        )
    elif distributed:
        out, lse = context_parallel_dilated_attention(
            q,
            k,
            v,
            config,
            cp_group=cp_group,
            head_offset=head_offset,
            position_offset=position_offset,
            backend=backend,
            documents=documents,
        )
    else:
        impl = get_backend(backend, q, documents=documents is not None)
        tasks = _cached_plan(config, q.shape[1], q.shape[2], k.shape[2], head_offset, position_offset)
        out, lse = DilatedAttentionFunction.apply(
            q, k, v, tasks, impl, config.causal, config.scale_for(q.shape[-1]), documents
        )
    return (out, lse) if return_lse else out


def _documents(document_ids: torch.Tensor | Documents | None, q: torch.Tensor) -> Documents | None:
    """``document_ids`` as :class:`Documents` on q's device, checked against q's ``[B, N]``."""
    if document_ids is None:
        return None
    if not isinstance(document_ids, Documents):
        document_ids = Documents(document_ids.to(q.device))
    document_ids.check(q)
    return document_ids


def _whole_function_kernel(
    q: torch.Tensor, config: DilatedAttentionConfig, backend: str | AttentionBackend, distributed: bool
):
    """The fused module when ``triton-fused`` is asked for, else None.

    Raises :class:`UnsupportedInputError` when it is asked for but cannot run the inputs.
    """
    name = resolve_name(backend) if isinstance(backend, str) else getattr(backend, "name", "")
    if name not in WHOLE_FUNCTION_BACKENDS:
        return None
    if distributed:
        raise UnsupportedInputError(
            f"backend {name!r} runs on one rank only; under context parallelism use a per-call kernel "
            "(auto, fa4, sdpa, te, triton, reference)"
        )
    try:
        fused = importlib.import_module(WHOLE_FUNCTION_BACKENDS["triton-fused"])
        fused.check_inputs(q, config)
    except (ImportError, UnsupportedInputError) as err:
        raise UnsupportedInputError(f"fused triton kernel: {err}") from err
    return fused


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
        document_ids: torch.Tensor | Documents | None = None,
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
            document_ids=document_ids,
        )

    def extra_repr(self) -> str:
        return f"patterns={self.config.patterns}, causal={self.config.causal}, backend={self.backend!r}"
