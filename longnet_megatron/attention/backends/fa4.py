"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) through its low-level ``_flash_attn_fwd`` / ``_flash_attn_bwd``.

FA4's public ``flash_attn_func`` is an autograd function that keeps its own output and log-sum-exp;
the two functions under it take and return them as plain tensors, so the backward can be given the
MERGED output and log-sum-exp of all patterns (docs/design.md section 2). Their layout is ours:
q, k, v ``[b, l, h, d]`` in, log-sum-exp ``[b, h, l]`` float32 (natural log) out; variable-length
calls take ``[total, h, d]`` with int32 ``cu_seqlens`` and give ``[h, total]``.

Strides: FA4 reads any tensor whose last dimension is contiguous and whose other strides and data
pointer are 16-byte aligned as it is, and copies the others itself (``maybe_contiguous``). Dilated
selections are views with a contiguous head dimension and strides that are multiples of the head
size, so with head_dim a multiple of 8 they go in without a copy; the merged log-sum-exp the backward
receives is a transposed gather, which FA4 copies (it is 1/head_dim of the tensors' size).
Gradients come back in fresh contiguous buffers, or (:meth:`FA4Backend.backward_into`) are written
into given views: the first pattern's, which cover every position, go straight into the gradient
tensors.

Causal masking is top-left aligned only when the query and key lengths are equal (FA4 aligns it
bottom-right otherwise), which is the only causal call the protocol makes. One-row sequences (a
partial last segment can select a single row) run in plain PyTorch, as for the cuDNN kernels, so they
add no kernel specialisation (FA4 compiles one per shape class at first use).

Kernels are compiled on first use (seconds each); ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps
them on disk for later processes.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import UnsupportedInputError
from .reference import ReferenceBackend

_DTYPES = (torch.float16, torch.bfloat16)
# Compute capabilities with FA4 forward AND backward kernels this backend is meant for (Hopper, Blackwell).
_MAJORS = (9, 10)
_NEEDS_DEVICE = "fa4 backend needs a CUDA device with compute capability 9.0 or 10.x"
_SINGLE_ROW = ReferenceBackend()


def _import_interface() -> tuple[Any, str | None]:
    """FA4's interface module, or None and the one-line reason it cannot be imported."""
    try:
        from flash_attn.cute import interface
    except (ImportError, OSError, RuntimeError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return None, (
            f"flash-attn-4 is not installed or does not import here ({first}); install flash-attn-4 "
            "(pip install flash-attn-4) on a machine with a Hopper or Blackwell GPU"
        )
    return interface, None


def head_dim_reason(head_dim: int, major: int) -> str | None:
    """None if FA4 runs this head size (q, k, v alike) on compute capability ``major``.x, else why not."""
    if major == 9:
        ok = 8 <= head_dim <= 256 and head_dim % 8 == 0
        limits = "a multiple of 8 from 8 to 256 on compute capability 9.x"
    else:
        ok = (8 <= head_dim <= 128 and head_dim % 8 == 0) or head_dim == 256
        limits = "a multiple of 8 from 8 to 128, or 256, on compute capability 10.x"
    return None if ok else f"fa4 backend needs head_dim {limits}, got {head_dim}"


class FA4Backend:
    """Dense and variable-length attention with log-sum-exp on FlashAttention-4's CuTe DSL kernels."""

    name = "fa4"
    varlen_cost = 1.0  # the variable-length calls run the same kernels, bounded per sequence

    def __init__(self) -> None:
        # A missing library is not an import error of this module: check() names it, so the
        # registry lists fa4 everywhere and "auto" moves on with the reason.
        self._interface, self.missing = _import_interface()
        self._checked: set[tuple[torch.dtype, int, torch.device]] = set()

    def check(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if FA4 cannot run ``q``."""
        key = (q.dtype, q.shape[-1], q.device)
        if key in self._checked:
            return
        if self.missing is not None:
            raise UnsupportedInputError(self.missing)
        if q.device.type != "cuda":
            raise UnsupportedInputError(f"{_NEEDS_DEVICE}, got device {q.device}")
        major, minor = torch.cuda.get_device_capability(q.device)
        if major not in _MAJORS:
            name = torch.cuda.get_device_name(q.device)
            raise UnsupportedInputError(f"{_NEEDS_DEVICE}, got {major}.{minor} ({name})")
        if q.dtype not in _DTYPES:
            raise UnsupportedInputError(
                f"fa4 backend needs float16 or bfloat16, got {str(q.dtype).removeprefix('torch.')}"
            )
        reason = head_dim_reason(q.shape[-1], major)
        if reason is not None:
            raise UnsupportedInputError(reason)
        self._checked.add(key)

    # -- the kernel boundary -------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [b, l, h, d], lse [b, h, l] float32)`` of softmax(q k^T * scale) v."""
        if q.shape[1] == 1:
            return _SINGLE_ROW.forward(q, k, v, causal=causal, scale=scale)
        out, lse = self._interface._flash_attn_fwd(
            q, k, v, softmax_scale=scale, causal=causal, return_lse=True
        )[:2]
        return out, lse

    def forward_into(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> None:
        """:meth:`forward` writing into given views: ``out [b, l, h, d]`` and ``lse [b, h, l]`` (l
        contiguous, other strides 16-byte aligned), the per-pattern buffers of the deferred merge."""
        if q.shape[1] == 1:
            o, lse_1 = _SINGLE_ROW.forward(q, k, v, causal=causal, scale=scale)
            out.copy_(o)
            lse.copy_(lse_1)
            return
        self._interface._flash_attn_fwd(
            q, k, v, softmax_scale=scale, causal=causal, return_lse=True, out=out, lse=lse
        )

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
        """``(dq, dk, dv)`` given the merged ``out`` and ``lse`` (``[b, h, l]``)."""
        if q.shape[1] == 1:
            return _SINGLE_ROW.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        dq, dk, dv = self._interface._flash_attn_bwd(
            q, k, v, out, dout, lse.float(), softmax_scale=scale, causal=causal
        )
        return dq, dk, dv

    def backward_into(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        causal: bool,
        scale: float,
    ) -> None:
        """:meth:`backward` writing ``(dq, dk, dv)`` into ``grads`` (views of the accumulators, any
        16-byte aligned strides): the first pattern's gradients land in place, with no copy."""
        if q.shape[1] == 1:
            for dst, grad in zip(grads, self.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)):
                dst.copy_(grad)
            return
        dq, dk, dv = grads
        self._interface._flash_attn_bwd(
            q, k, v, out, dout, lse.float(), softmax_scale=scale, causal=causal, dq=dq, dk=dk, dv=dv
        )

    # -- variable-length batches (document masking) ---------------------------------------------
    def check_varlen(self, q: torch.Tensor) -> None:
        """The same limits as the dense calls."""
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
        """``(out [t, h, d], lse [h, t] float32)`` of each sequence of the batch attending itself."""
        out, lse = self._interface._flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, softmax_scale=scale, causal=causal, return_lse=True,
        )[:2]  # fmt: skip
        return out, lse

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
        """``(dq, dk, dv)`` ``[t, h, d]`` given the merged ``out`` and ``lse`` ``[h, t]``."""
        dq, dk, dv = self._interface._flash_attn_bwd(
            q, k, v, out, dout, lse.float(), softmax_scale=scale, causal=causal, cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        )  # fmt: skip
        return dq, dk, dv
