"""PyTorch's fused attention kernels (cuDNN, flash, memory-efficient) through their ATen entry points.

``torch.nn.functional.scaled_dot_product_attention`` hides the log-sum-exp, so this backend calls the
ops underneath it, which return it, and their ``*_backward`` ops, which take the output and
log-sum-exp as arguments: the MERGED ones can be passed (docs/design.md section 2).

The ops work in ``[b, h, l, d]``; our tensors are ``[b, l, h, d]``, so q, k, v go in as transposed
views (no copy; strided selections stay views too) and results come back as views. Per kernel:

* cuDNN: log-sum-exp ``[b, h, l, 1]`` float32; the fastest on Hopper.
* flash: log-sum-exp ``[b, h, l]`` float32.
* efficient: log-sum-exp ``[b, h, ceil(l / 32) * 32]`` (padded); the only one taking float32 inputs.
  It is the last resort: inputs are made contiguous for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .base import UnsupportedInputError
from .reference import ReferenceBackend

aten = torch.ops.aten

# Kernels in order of preference on Hopper (measured on an H100, bf16, fwd+bwd on batches of
# 2048-token sequences: cuDNN ~355 TFLOP/s, flash ~224).
KERNELS = ("cudnn", "flash", "efficient")
_CAN_USE = {
    "cudnn": "can_use_cudnn_attention",
    "flash": "can_use_flash_attention",
    "efficient": "can_use_efficient_attention",
}
_HALF = (torch.float16, torch.bfloat16)
# cuDNN rejects one-token sequences (a partial last segment can select a single row); those tiny calls
# run in plain PyTorch instead.
_SINGLE_ROW = ReferenceBackend()
_DTYPES = {"cudnn": _HALF, "flash": _HALF, "efficient": (*_HALF, torch.float32)}


@dataclass
class _RngState:
    """The dropout-state tensors a kernel's forward returns (unused at dropout 0, but required)."""

    seed: torch.Tensor
    offset: torch.Tensor


def _probe_support(kernel: str, dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """None if ``kernel`` runs causal attention of this dtype and head size here, else the reason."""
    if dtype not in _DTYPES[kernel]:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES[kernel])
        return f"dtype {str(dtype).removeprefix('torch.')} is not supported (needs one of {names})"
    probe = torch.empty(1, 1, 64, head_dim, dtype=dtype, device=device)
    params = torch.backends.cuda.SDPAParams(probe, probe, probe, None, 0.0, True, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = getattr(torch.backends.cuda, _CAN_USE[kernel])(params, True)
    if ok:
        return None
    reasons = "; ".join(str(w.message).strip() for w in caught) or "PyTorch reports it unavailable"
    return f"head_dim={head_dim}, dtype {str(dtype).removeprefix('torch.')}: {reasons}"


class SdpaBackend:
    """Dense attention with log-sum-exp on PyTorch's fused CUDA kernels.

    ``kernel`` is ``"cudnn"``, ``"flash"``, ``"efficient"``, or ``"auto"`` (the first of those that
    accepts the inputs, in that order).
    """

    name = "sdpa"
    kernel = "auto"

    def __init__(self, kernel: str | None = None) -> None:
        if kernel is not None:
            self.kernel = kernel
        if self.kernel != "auto" and self.kernel not in KERNELS:
            raise ValueError(f"unknown sdpa kernel {self.kernel!r}; choose 'auto' or one of {KERNELS}")
        self._choice: dict[tuple[torch.dtype, int, torch.device], str] = {}
        self._rng: dict[tuple[str, torch.device], _RngState] = {}

    # -- choosing the kernel -------------------------------------------------------------------
    def select(self, q: torch.Tensor) -> str:
        """The kernel used for tensors like ``q``; raises :class:`UnsupportedInputError` with reasons."""
        key = (q.dtype, q.shape[-1], q.device)
        if key in self._choice:
            return self._choice[key]
        if q.device.type != "cuda":
            raise UnsupportedInputError(f"{self.name} backend needs CUDA tensors, got device {q.device}")
        candidates = KERNELS if self.kernel == "auto" else (self.kernel,)
        reasons = []
        for kernel in candidates:
            reason = _probe_support(kernel, q.dtype, q.shape[-1], q.device)
            if reason is None:
                self._choice[key] = kernel
                return kernel
            reasons.append(f"{kernel}: {reason}")
        raise UnsupportedInputError(f"{self.name} backend cannot run these inputs: " + " | ".join(reasons))

    def check(self, q: torch.Tensor) -> None:
        """Raise :class:`UnsupportedInputError` naming the reason if no kernel takes ``q``."""
        self.select(q)

    def _rng_state(self, kernel: str, like: torch.Tensor) -> _RngState:
        """Dropout-state tensors of the kernel's own forward (made once per device by a tiny call)."""
        key = (kernel, like.device)
        if key not in self._rng:
            probe = torch.zeros(1, 1, 16, like.shape[-1], dtype=like.dtype, device=like.device)
            if kernel == "cudnn":
                res = aten._scaled_dot_product_cudnn_attention(probe, probe, probe, None, True, 0.0, True)
                state = _RngState(res[6], res[7])
            elif kernel == "flash":
                res = aten._scaled_dot_product_flash_attention(probe, probe, probe, 0.0, True)
                state = _RngState(res[6], res[7])
            else:
                res = aten._scaled_dot_product_efficient_attention(probe, probe, probe, None, True, 0.0, True)
                state = _RngState(res[2], res[3])
            self._rng[key] = state
        return self._rng[key]

    # -- the kernel boundary -------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [b, l, h, d], lse [b, h, l] float32)`` of softmax(q k^T * scale) v."""
        kernel = self.select(q)
        length = q.shape[1]
        if kernel == "cudnn" and length == 1:
            return _SINGLE_ROW.forward(q, k, v, causal=causal, scale=scale)
        if kernel == "efficient":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kernel == "cudnn":
            res = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, scale=scale)
            out, lse = res[0], res[1].reshape(q.shape[0], q.shape[2], length)
        elif kernel == "flash":
            out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, scale=scale)[:2]
        else:
            res = aten._scaled_dot_product_efficient_attention(
                qt, kt, vt, None, True, 0.0, causal, scale=scale
            )
            out, lse = res[0], res[1][..., :length]
        return out.transpose(1, 2), lse

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
        kernel = self.select(q)
        b, length, h = q.shape[:3]
        if kernel == "cudnn" and length == 1:
            return _SINGLE_ROW.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
        if kernel == "efficient":
            dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
        rng = self._rng_state(kernel, q)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # The kernels read dO in O's layout; both come from one selection, so this is normally a view.
        ot = out.transpose(1, 2)
        dot = dout.transpose(1, 2)
        if dot.stride() != ot.stride():
            dot = torch.empty_like(ot).copy_(dot)
        if kernel == "cudnn":  # a fresh [b, h, l, 1] buffer: cuDNN checks every stride of it
            lse = torch.empty((b, h, length, 1), dtype=torch.float32, device=q.device).copy_(lse[..., None])
            grads = aten._scaled_dot_product_cudnn_attention_backward(
                dot, qt, kt, vt, ot, lse, rng.seed, rng.offset, None, None, None, length, k.shape[1],
                0.0, causal, scale=scale,
            )  # fmt: skip
        elif kernel == "flash":
            grads = aten._scaled_dot_product_flash_attention_backward(
                dot, qt, kt, vt, ot, lse.float().contiguous(), None, None, length, k.shape[1], 0.0, causal,
                rng.seed, rng.offset, scale=scale,
            )  # fmt: skip
        else:
            padded = torch.zeros((b, h, -(-length // 32) * 32), dtype=torch.float32, device=q.device)
            padded[..., :length] = lse
            grads = aten._scaled_dot_product_efficient_attention_backward(
                dot, qt, kt, vt, None, ot, padded, rng.seed, rng.offset, 0.0, [True, True, True, False],
                causal, scale=scale,
            )[:3]  # fmt: skip
        dq, dk, dv = (g.transpose(1, 2) for g in grads)
        return dq, dk, dv


class SdpaCudnnBackend(SdpaBackend):
    """:class:`SdpaBackend` pinned to PyTorch's cuDNN attention."""

    name = "sdpa-cudnn"
    kernel = "cudnn"


class SdpaFlashBackend(SdpaBackend):
    """:class:`SdpaBackend` pinned to PyTorch's built-in flash attention."""

    name = "sdpa-flash"
    kernel = "flash"


class SdpaEfficientBackend(SdpaBackend):
    """:class:`SdpaBackend` pinned to PyTorch's memory-efficient attention."""

    name = "sdpa-efficient"
    kernel = "efficient"
