"""Attention kernels behind one interface, and the automatic choice among them.

``get_backend("auto", q)`` tries the fused kernels in order of measured speed and takes the first that
imports and accepts ``q``: ``sdpa`` (PyTorch's cuDNN, flash or memory-efficient kernel, in that order),
then ``te`` (Transformer Engine's cuDNN attention), then ``reference``. On the H100 (bf16, D = 128,
benchmarks/attention.md) sdpa's cuDNN path is 15-25% faster than te at N >= 32K: it takes the strided
dilated selections as views, where TE's fixed layouts need a copy per call. A name picks one explicitly and fails
with the reason if it cannot run; ``sdpa-cudnn``, ``sdpa-flash`` and ``sdpa-efficient`` pin one of
PyTorch's kernels. The environment variable ``LONGNET_ATTENTION_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .base import AttentionBackend, UnsupportedInputError
from .reference import ReferenceBackend

# name -> "module:Class" (imported lazily: fused kernels need CUDA libraries that may be absent).
_REGISTRY: dict[str, str | Callable[[], AttentionBackend]] = {
    "te": ".te:TEBackend",
    "sdpa": ".sdpa:SdpaBackend",
    "sdpa-cudnn": ".sdpa:SdpaCudnnBackend",
    "sdpa-flash": ".sdpa:SdpaFlashBackend",
    "sdpa-efficient": ".sdpa:SdpaEfficientBackend",
    "reference": ReferenceBackend,
}
_AUTO_ORDER: list[str] = ["sdpa", "te", "reference"]
OVERRIDE_ENV = "LONGNET_ATTENTION_BACKEND"
_CACHE: dict[str, AttentionBackend] = {}
# Backends whose import or construction failed, with the error (re-raised without retrying).
_FAILED: dict[str, Exception] = {}
_LOAD_ERRORS = (ImportError, OSError, RuntimeError)


def register_backend(
    name: str, factory: str | Callable[[], AttentionBackend], *, auto_rank: int | None = None
) -> None:
    """Add a backend; ``auto_rank`` places it in the automatic order (0 = tried first)."""
    _REGISTRY[name] = factory
    _CACHE.pop(name, None)
    _FAILED.pop(name, None)
    if auto_rank is not None:
        if name in _AUTO_ORDER:
            _AUTO_ORDER.remove(name)
        _AUTO_ORDER.insert(auto_rank, name)


register_backend("triton", ".triton_kernel:TritonBackend", auto_rank=2)  # the project's own; after sdpa, te
register_backend("triton-calls", ".triton_kernel:TritonCallsBackend")


def available_backends() -> list[str]:
    """Names of all registered backends (importable or not)."""
    return sorted(_REGISTRY)


def _load(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; choose 'auto' or one of {available_backends()}"
        )
    if name in _FAILED:
        raise _FAILED[name]
    if name not in _CACHE:
        factory = _REGISTRY[name]
        try:
            if isinstance(factory, str):
                module, _, attr = factory.partition(":")
                factory = getattr(importlib.import_module(module, __package__), attr)
            _CACHE[name] = factory()
        except _LOAD_ERRORS as err:
            _FAILED[name] = err
            raise
    return _CACHE[name]


def get_backend(name: str | AttentionBackend = "auto", q: torch.Tensor | None = None) -> AttentionBackend:
    """Resolve ``name`` (or pass through a backend object), checking it accepts ``q`` when given."""
    if not isinstance(name, str):
        if q is not None:
            name.check(q)
        return name
    if name == "auto":
        name = os.environ.get(OVERRIDE_ENV, "auto") or "auto"
    if name != "auto":
        backend = _load(name)
        if q is not None:
            backend.check(q)
        return backend
    reasons = []
    for candidate in _AUTO_ORDER:
        if candidate.startswith("triton") and q is not None and q.device.type != "cuda":
            continue  # never Triton's CPU interpreter unless asked for by name
        try:
            backend = _load(candidate)
            if q is not None:
                backend.check(q)
            return backend
        except (*_LOAD_ERRORS, UnsupportedInputError) as err:
            reasons.append(f"{candidate}: {err}")
    raise UnsupportedInputError("no attention backend accepts these inputs: " + "; ".join(reasons))


__all__ = [
    "AttentionBackend",
    "ReferenceBackend",
    "UnsupportedInputError",
    "available_backends",
    "get_backend",
    "register_backend",
]
