"""Attention kernels behind one interface, the one list of their names, and the automatic choice.

Two kinds of backend share one namespace (:func:`backend_names` lists every name a user may give):

* per-call kernels (:class:`~.base.AttentionBackend`): dense attention with log-sum-exp and its
  backward; ``dilated_attention`` runs one per (pattern, head offset, block) and merges them. They
  also serve context parallelism. ``reference`` (PyTorch math, any device), ``sdpa`` (PyTorch's cuDNN,
  flash or memory-efficient kernel, first that accepts the inputs; ``sdpa-cudnn``, ``sdpa-flash``,
  ``sdpa-efficient`` pin one), ``te`` (Transformer Engine's cuDNN attention), ``fa4``
  (FlashAttention-4's CuTe DSL kernels, Hopper and Blackwell), ``triton`` (the project's own Triton
  kernel).
* whole-function kernels, which compute all patterns of one rank at once: ``triton-fused``
  (:mod:`..fused`, one online softmax over every pattern, strided loads). They run on one rank only.

``"auto"`` takes the first per-call kernel of :data:`AUTO_ORDER` that imports and accepts the
inputs (with document masking, the first whose variable-length path accepts them too): ``fa4``
(where flash-attn-4 is installed, on compute capability 9.x/10.x), then ``sdpa``, then ``te``, then
``triton`` (CUDA tensors only: never Triton's CPU interpreter), then ``reference``. On the H200 (bf16,
D = 128, benchmarks/attention_wrapper.md) fa4 is the fastest at every N >= 16K (346 against sdpa-cudnn's
309 useful TFLOP/s at 128K, 362 against 329 at 1M) and with document masking at 1M (0.97-1.12x of
its unmasked time, where sdpa's flash varlen path is at 0.78-0.80x); at 8K the two are equal. sdpa's
cuDNN path is 15-25% faster than te at N >= 32K (H100: it takes strided dilated selections as views,
where TE's fixed layouts need a copy per call) and the per-call Triton kernel is slower than all of
them. "auto" never picks ``triton-fused``. A name picks one backend explicitly and fails with the
reason if it cannot run.
The environment variable ``LONGNET_ATTENTION_BACKEND`` overrides ``"auto"`` (not an explicit name).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .base import AttentionBackend, UnsupportedInputError, VarlenBackend
from .reference import ReferenceBackend

# name -> "module:Class" (imported lazily: fused kernels need CUDA libraries that may be absent).
_REGISTRY: dict[str, str | Callable[[], AttentionBackend]] = {
    "te": ".te:TEBackend",
    "fa4": ".fa4:FA4Backend",
    "sdpa": ".sdpa:SdpaBackend",
    "sdpa-cudnn": ".sdpa:SdpaCudnnBackend",
    "sdpa-flash": ".sdpa:SdpaFlashBackend",
    "sdpa-efficient": ".sdpa:SdpaEfficientBackend",
    "reference": ReferenceBackend,
}
AUTO_ORDER: list[str] = ["fa4", "sdpa", "te", "reference"]
# Whole-function kernels (all patterns of one rank in one pass): name -> the module that runs them.
WHOLE_FUNCTION_BACKENDS: dict[str, str] = {"triton-fused": "longnet_megatron.attention.fused"}
AUTO = "auto"
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
        if name in AUTO_ORDER:
            AUTO_ORDER.remove(name)
        AUTO_ORDER.insert(auto_rank, name)


register_backend(
    "triton", ".triton_kernel:TritonBackend", auto_rank=3
)  # the project's own; after fa4, sdpa, te


def available_backends() -> list[str]:
    """Names of the registered per-call kernels (importable or not)."""
    return sorted(_REGISTRY)


def backend_names() -> list[str]:
    """Every name ``backend=`` accepts: ``"auto"``, the per-call kernels and the whole-function ones."""
    return [AUTO, *available_backends(), *sorted(WHOLE_FUNCTION_BACKENDS)]


def resolve_name(name: str) -> str:
    """``name`` with ``"auto"`` replaced by ``LONGNET_ATTENTION_BACKEND`` when that is set."""
    if name == AUTO:
        return os.environ.get(OVERRIDE_ENV, AUTO) or AUTO
    return name


def check_backend_name(name: str) -> None:
    """Raise ValueError naming the choices when ``name`` is no backend name."""
    if name not in backend_names():
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")


def _load(name: str) -> AttentionBackend:
    if name in WHOLE_FUNCTION_BACKENDS:
        raise UnsupportedInputError(
            f"{name!r} computes all patterns at once on one rank and has no per-call kernel; give "
            "dilated_attention(backend=...) that name, or a per-call kernel (triton) under context parallelism"
        )
    check_backend_name(name)
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


def _check(backend: AttentionBackend, q: torch.Tensor | None, documents: bool) -> None:
    """Raise :class:`UnsupportedInputError` unless ``backend`` takes ``q`` (and variable-length calls)."""
    if q is not None:
        backend.check(q)
    if documents:
        if not isinstance(backend, VarlenBackend):
            raise UnsupportedInputError(
                f"backend {getattr(backend, 'name', backend)!r} has no variable-length path for document masking"
            )
        if q is not None:
            backend.check_varlen(q)


def get_backend(
    name: str | AttentionBackend = "auto", q: torch.Tensor | None = None, *, documents: bool = False
) -> AttentionBackend:
    """Resolve ``name`` (or pass through a backend object), checking it accepts ``q`` when given.

    ``documents``: the backend must also run variable-length calls (document masking).
    """
    if not isinstance(name, str):
        _check(name, q, documents)
        return name
    name = resolve_name(name)
    if name != AUTO:
        backend = _load(name)
        _check(backend, q, documents)
        return backend
    reasons = []
    for candidate in AUTO_ORDER:
        if candidate.startswith("triton") and q is not None and q.device.type != "cuda":
            continue  # never Triton's CPU interpreter unless asked for by name
        try:
            backend = _load(candidate)
            if q is None and getattr(backend, "missing", None):  # nothing to check: skip what cannot load
                raise UnsupportedInputError(backend.missing)
            _check(backend, q, documents)
            return backend
        except (*_LOAD_ERRORS, UnsupportedInputError) as err:
            reasons.append(f"{candidate}: {err}")
    what = "these inputs with document masking" if documents else "these inputs"
    raise UnsupportedInputError(f"no attention backend accepts {what}: " + "; ".join(reasons))


__all__ = [
    "AUTO_ORDER",
    "WHOLE_FUNCTION_BACKENDS",
    "AttentionBackend",
    "ReferenceBackend",
    "UnsupportedInputError",
    "VarlenBackend",
    "available_backends",
    "backend_names",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "resolve_name",
]
