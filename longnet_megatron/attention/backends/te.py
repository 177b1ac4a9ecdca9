"""Transformer Engine's fused attention (cuDNN) through ``fused_attn_fwd`` / ``fused_attn_bwd``.

TE's forward returns the softmax statistics (natural-log log-sum-exp of the scaled scores, float32
``[b, h, l, 1]``) as the first of its ``aux_ctx_tensors``; its backward takes them back in the same
place, so the MERGED log-sum-exp and output go in there (docs/design.md section 2).

Tensors are passed in the ``bshd_bshd_bshd`` layout, which TE reads as contiguous: a strided selection
(dilation r > 1) is copied once per call, the r = 1 views go in as they are. The arguments are passed
by name and filtered against the installed signature, which has grown across TE 2.x releases.

Variable-length calls (document masking) use the ``thd_thd_thd`` layout with ``cu_seqlens`` (and the
same offsets as ``cu_seqlens_*_padded``) and a padding mask. Their softmax statistics come back
token-major, ``[t, h, 1]`` (possibly with rows past t: TE rounds the token count), from cuDNN 9.6 on,
and batch-major padded, ``[sequences, h, max_seqlen, 1]``, before; both are read (and written back
for the backward) in the shape the forward returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .base import UnsupportedInputError, run_index
from .reference import ReferenceBackend

_DTYPES = (torch.float16, torch.bfloat16)
# Shapes of recent variable-length forwards' statistics, for their backward (a few steps of calls).
_STATS_SHAPES_KEPT = 4096
_VARLEN_LAYOUT = {
    "qkv_layout": "thd_thd_thd",
    "o_format": "thd",
    "do_format": "thd",
    "dqkv_layout": "thd_thd_thd",
}
MAX_HEAD_DIM = 256
# cuDNN rejects one-token sequences (a partial last segment can select a single row): plain PyTorch.
_SINGLE_ROW = ReferenceBackend()


def _by_name(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` called with only the keyword arguments it accepts (TE's signatures differ by release)."""
    accepted = frozenset(inspect.signature(fn).parameters)

    def call(**kwargs: Any) -> Any:
        return fn(**{k: v for k, v in kwargs.items() if k in accepted})

    return call


class TEBackend:
    """Dense attention with log-sum-exp on Transformer Engine's cuDNN fused attention."""

    name = "te"
    varlen_cost = 1.0  # THD runs cuDNN's own kernel, as the dense calls do

    def __init__(self) -> None:
        # An ImportError makes the automatic choice move on; named explicitly, it says what is missing.
        try:
            from transformer_engine.pytorch.constants import TE_DType
            from transformer_engine.pytorch.cpp_extensions.fused_attn import (
                FusedAttnBackend,
                fused_attn_bwd,
                fused_attn_fwd,
            )
        except ImportError as err:
            raise ImportError(f"te backend needs Transformer Engine's PyTorch extension: {err}") from err
        except OSError as err:  # e.g. TE's cuDNN libraries loaded after PyTorch's, with other symbols
            raise ImportError(
                f"te backend: Transformer Engine's libraries failed to load ({err}); import "
                "transformer_engine before the first cuDNN call of the process"
            ) from err

        self._fwd, self._bwd = _by_name(fused_attn_fwd), _by_name(fused_attn_bwd)
        self._te_dtype = TE_DType
        self._kernel = FusedAttnBackend["F16_arbitrary_seqlen"]
        self._cu_seqlens: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._rng_state: dict[torch.device, torch.Tensor] = {}
        # (total, sequences, max_seqlen, heads, device) -> shape of the forward's softmax statistics
        self._stats_shapes: dict[tuple, tuple[int, ...]] = {}

    def check(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if TE cannot run ``q``."""
        if q.device.type != "cuda":
            raise UnsupportedInputError(f"te backend needs CUDA tensors, got device {q.device}")
        if q.dtype not in _DTYPES:
            raise UnsupportedInputError(
                f"te backend needs float16 or bfloat16, got {str(q.dtype).removeprefix('torch.')}"
            )
        d = q.shape[-1]
        if d % 8 or d > MAX_HEAD_DIM:
            raise UnsupportedInputError(
                f"te backend needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM}, got {d}"
            )

    def _cu(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        key = (batch, length, device)
        if key not in self._cu_seqlens:
            self._cu_seqlens[key] = torch.arange(
                0, (batch + 1) * length, length, dtype=torch.int32, device=device
            )
        return self._cu_seqlens[key]

    def _common(self, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> dict[str, Any]:
        b, length_q, length_kv = q.shape[0], q.shape[1], k.shape[1]
        return {
            **self._flags(q.dtype, causal, scale),
            "max_seqlen_q": length_q,
            "max_seqlen_kv": length_kv,
            "cu_seqlens_q": self._cu(b, length_q, q.device),
            "cu_seqlens_kv": self._cu(b, length_kv, q.device),
        }

    def _flags(self, dtype: torch.dtype, causal: bool, scale: float) -> dict[str, Any]:
        return {
            "fake_dtype": dtype,
            "fused_attention_backend": self._kernel,
            "attn_scale": scale,
            "dropout": 0.0,
            "fast_zero_fill": True,
            "qkv_layout": "bshd_bshd_bshd",
            "o_format": "bshd",
            "do_format": "bshd",
            "dqkv_layout": "bshd_bshd_bshd",
            "attn_bias_type": "no_bias",
            "attn_mask_type": "causal" if causal else "no_mask",
            "softmax_type": "vanilla",
            "window_size": (-1, 0) if causal else (-1, -1),
            "bottom_right_diagonal": False,
        }

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [b, l, h, d], lse [b, h, l] float32)`` of softmax(q k^T * scale) v."""
        if q.shape[1] == 1:
            return _SINGLE_ROW.forward(q, k, v, causal=causal, scale=scale)
        res = self._fwd(
            is_training=True,
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            **self._common(q, k, causal, scale),
        )
        out, aux = res[0], res[1]
        if q.device not in self._rng_state:
            self._rng_state[q.device] = aux[1]
        b, length, h = q.shape[:3]
        return out, aux[0].reshape(b, h, length)

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
        b, length, h = q.shape[:3]
        if length == 1:
            return _SINGLE_ROW.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        stats = lse.to(torch.float32).contiguous().view(b, h, length, 1)
        rng = self._rng_state.get(q.device)
        if rng is None:
            rng = self._rng_state[q.device] = torch.zeros(2, dtype=torch.int64, device=q.device)
        grads = self._bwd(
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            o=out.contiguous(),
            d_o=dout.contiguous(),
            dqkv_dtype=self._te_dtype[q.dtype],
            aux_ctx_tensors=[stats, rng],
            deterministic=False,
            **self._common(q, k, causal, scale),
        )
        return grads[0], grads[1], grads[2]

    # -- variable-length batches (document masking) ---------------------------------------------
    def check_varlen(self, q: torch.Tensor) -> None:
        """The same limits as the dense calls."""
        self.check(q)

    def _varlen_common(
        self, cu_seqlens: torch.Tensor, max_seqlen: int, q: torch.Tensor, causal: bool, scale: float
    ) -> dict[str, Any]:
        return {
            **self._flags(q.dtype, causal, scale),
            **_VARLEN_LAYOUT,
            "max_seqlen_q": max_seqlen,
            "max_seqlen_kv": max_seqlen,
            "cu_seqlens_q": cu_seqlens,
            "cu_seqlens_kv": cu_seqlens,
            "cu_seqlens_q_padded": cu_seqlens,
            "cu_seqlens_kv_padded": cu_seqlens,
            "attn_mask_type": "padding_causal" if causal else "padding",
        }

    def _stats_key(self, q: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple:
        return (q.shape[0], cu_seqlens.numel() - 1, max_seqlen, q.shape[1], q.device)

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
        res = self._fwd(
            is_training=True,
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            **self._varlen_common(cu_seqlens, max_seqlen, q, causal, scale),
        )
        out, aux = res[0], res[1]
        if q.device not in self._rng_state:
            self._rng_state[q.device] = aux[1]
        stats = aux[0]
        if len(self._stats_shapes) >= _STATS_SHAPES_KEPT:
            self._stats_shapes.pop(next(iter(self._stats_shapes)))
        self._stats_shapes[self._stats_key(q, cu_seqlens, max_seqlen)] = tuple(stats.shape)
        total, heads = q.shape[:2]
        if stats.dim() == 3:  # token-major [t', h, 1], t' >= t
            return out, stats[:total, :, 0].t()
        piece = run_index(cu_seqlens, total)
        pos = torch.arange(total, device=q.device) - cu_seqlens[piece]
        return out, stats[piece, :, pos, 0].t()

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
        total, heads = q.shape[:2]
        shape = self._stats_shapes.get(self._stats_key(q, cu_seqlens, max_seqlen), (total, heads, 1))
        stats = torch.zeros(shape, dtype=torch.float32, device=q.device)
        if len(shape) == 3:
            stats[:total, :, 0] = lse.t()
        else:
            piece = run_index(cu_seqlens, total)
            pos = torch.arange(total, device=q.device) - cu_seqlens[piece]
            stats[piece, :, pos, 0] = lse.t().float()
        rng = self._rng_state.get(q.device)
        if rng is None:
            rng = self._rng_state[q.device] = torch.zeros(2, dtype=torch.int64, device=q.device)
        grads = self._bwd(
            q=q.contiguous(),
            k=k.contiguous(),
            v=v.contiguous(),
            o=out.contiguous(),
            d_o=dout.contiguous(),
            dqkv_dtype=self._te_dtype[q.dtype],
            aux_ctx_tensors=[stats, rng],
            deterministic=False,
            **self._varlen_common(cu_seqlens, max_seqlen, q, causal, scale),
        )
        return grads[0], grads[1], grads[2]
