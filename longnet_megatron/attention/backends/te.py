"""Transformer Engine's fused attention (cuDNN) through ``fused_attn_fwd`` / ``fused_attn_bwd``.

TE's forward returns the softmax statistics (natural-log log-sum-exp of the scaled scores, float32
``[b, h, l, 1]``) as the first of its ``aux_ctx_tensors``; its backward takes them back in the same
place, so the MERGED log-sum-exp and output go in there (docs/design.md section 2).

Tensors are passed in the ``bshd_bshd_bshd`` layout, which TE reads as contiguous: a strided selection
(dilation r > 1) is copied once per call, the r = 1 views go in as they are. The arguments are passed
by name and filtered against the installed signature, which has grown across TE 2.x releases.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .base import UnsupportedInputError
from .reference import ReferenceBackend

_DTYPES = (torch.float16, torch.bfloat16)
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
            "max_seqlen_q": length_q,
            "max_seqlen_kv": length_kv,
            "cu_seqlens_q": self._cu(b, length_q, q.device),
            "cu_seqlens_kv": self._cu(b, length_kv, q.device),
            "fake_dtype": q.dtype,
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
