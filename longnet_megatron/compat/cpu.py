"""Run Megatron-Core on CPU (gloo) by redirecting its hard-coded CUDA calls.

Megatron-Core 0.16 assumes a GPU in a few dozen places that have nothing to do with the math:
pipeline p2p shape buffers (``torch.empty(..., device=torch.cuda.current_device())``), token counters
(``torch.zeros([], device="cuda")``), ``tensor.cuda()`` on small bookkeeping tensors,
``torch.cuda.synchronize()`` after communication, and the model-parallel RNG tracker, which stores and
swaps CUDA generator states. On a CPU-only machine every one of them raises.

:func:`enable_cpu_megatron` makes those calls mean "the CPU" instead, without copying or forking any
Megatron code:

* a :class:`torch.overrides.TorchFunctionMode`, pushed on the calling thread (call the function again
  from any other thread that runs Megatron code), rewrites any non-CPU ``device`` argument
  (``"cuda"``, ``cuda:N``, a bare integer index) of tensor factories and of ``Tensor.to`` to ``"cpu"``,
  makes ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor itself, drops
  ``pin_memory=True`` arguments (pinned memory needs CUDA), and makes ``Tensor.type()`` name CPU
  tensors as CUDA ones (Megatron's optimizers select parameters by that name);
* Megatron's batched pipeline p2p (``batch_p2p_comm=True``, the default) goes through its unbatched
  path, whose message order gloo matches correctly (see :func:`_unbatched_p2p_ops`);
* ``torch.cuda.current_device`` returns ``torch.device("cpu")``, ``torch.cuda.current_stream`` a
  stream whose waits do nothing, and ``torch.cuda.synchronize`` / ``torch.cuda.set_device`` become
  no-ops;
* Megatron's RNG tracker class is replaced by :class:`CpuRNGStatesTracker`, which keeps named CPU
  generator states and forks the CPU default generator the way the CUDA tracker forks the CUDA one
  (on CPU, dropout and initialisation draw from the CPU generator, so that is the generator to fork);
  the get/set-state helpers that activation recomputation uses read and write the CPU generator.

It is a no-op when CUDA is available (unless ``force=True``): on a GPU nothing is patched. It is
idempotent, so every entry point (tests, the CPU training default, conversion tools) can just call it
first.

Limits of the mode: it is pushed on the calling thread's torch-function stack, and PyTorch pops a mode
while it handles a call. ``loss.backward()`` / ``torch.autograd.backward`` are such calls, so code that
runs inside backward (autograd Functions, hooks) does not see the mode. Megatron's backward code names
the device through ``torch.cuda.current_device()``, which is why that returns a CPU device object
rather than an index: it then needs no mode at all. A literal ``"cuda"`` inside a backward pass would
still fail; none exists in the paths the tests cover (TP, PP, VPP schedules).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_STATE_LOCK = threading.Lock()
_ENABLED_THREADS: set[int] = set()
_PATCHED = False


def _is_foreign_device(device: Any) -> bool:
    """True for a device argument that names an accelerator (anything but the CPU or meta)."""
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return not (device.startswith("cpu") or device.startswith("meta"))
    if isinstance(device, torch.device):
        return device.type not in ("cpu", "meta")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Torch-function mode that maps every accelerator device argument to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105 - torch protocol
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory"):
            # Tensor.cuda(...) / Tensor.pin_memory(): the tensor is already where it can be.
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers sort parameters by `param.type() == "torch.cuda.FloatTensor"`.
            type_name = func(args[0])
            return (
                type_name.replace("torch.", "torch.cuda.", 1) if type_name.startswith("torch.") else type_name
            )
        if _is_foreign_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if name == "to" and len(args) > 1 and _is_foreign_device(args[1]):  # Tensor.to("cuda", ...)
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Named CPU generator states with Megatron's ``CudaRNGStatesTracker`` interface.

    Megatron forks the tracker's "model-parallel-rng" state around weight initialisation and
    tensor-parallel dropout so that those draws differ per TP rank but match across data-parallel
    replicas. On CPU the draws come from the CPU default generator, so ``fork`` swaps that one.
    """

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        if use_cudagraphable_rng:
            raise ValueError("CUDA-graph-safe RNG states do not exist on CPU")
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self) -> bool:
        """Whether a state was added or set."""
        return self._is_initialized

    def reset(self) -> None:
        """Forget every state."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A shallow copy of the name -> state map (what checkpoints save)."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the states (checkpoint load)."""
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Create state ``name`` from ``seed`` without disturbing the current generator."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        """Draw from state ``name`` inside the block; restore the default generator after it."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: work is already ordered, waits are no-ops."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


def _unbatched_p2p_ops(**kwargs: Any) -> list:
    """Megatron's ``batch_p2p_comm`` path, made safe for gloo.

    Megatron's batched path issues send-prev, recv-prev, send-next, recv-next in one group. With two
    pipeline ranks, prev and next are the same peer, and gloo matches messages per (group, peer) in
    issue order, so an activation and a gradient of the same shape are silently swapped (interleaved
    schedules hit this). Megatron's unbatched path orders the operations by rank parity and splits the
    two directions over two groups; it is used instead, returning the request list the batched
    path's caller waits on.
    """
    from megatron.core.pipeline_parallel import p2p_communication as mcore_p2p

    return list(mcore_p2p._p2p_ops(**kwargs).values())


def _patch_process_globals() -> None:
    """Patch torch.cuda's device queries and Megatron's RNG tracker class (once per process)."""
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.pipeline_parallel import p2p_communication as mcore_p2p
    from megatron.core.tensor_parallel import random as mcore_random

    # A device object, not an index: `device=torch.cuda.current_device()` must mean the CPU even where
    # the mode is not on the stack (see the module docstring).
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM  # megatron-core 0.19's gradient sync
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.set_device = lambda device: None
    # Megatron builds its tracker from this module-level name; the TE tracker is never chosen
    # without TE. A tracker created before this call is dropped so the next access rebuilds it.
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recomputation saves and restores "the CUDA state" through these two helpers.
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )
    mcore_p2p._batched_p2p_ops = _unbatched_p2p_ops
    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    _PATCHED = True


def cpu_megatron_enabled() -> bool:
    """Whether :func:`enable_cpu_megatron` is active on the calling thread."""
    return threading.get_ident() in _ENABLED_THREADS


def enable_cpu_megatron(force: bool = False) -> bool:
    """Make Megatron-Core's CUDA-only code paths run on the CPU, for the rest of the process.

    Call it before building models or running schedules on a machine without a GPU (tests, the CPU
    training default, conversion tools). Safe to call any number of times; a second call on the same
    thread does nothing. Returns True when the shim is active, False when CUDA is available and
    ``force`` is not set (then nothing is changed: real GPU runs never go through the shim).
    """
    if torch.cuda.is_available() and not force:
        return False
    with _STATE_LOCK:
        _patch_process_globals()
        if threading.get_ident() not in _ENABLED_THREADS:
            # Entered and never exited: the mode stays on this thread's torch-function stack.
            _CudaToCpuMode().__enter__()
            _ENABLED_THREADS.add(threading.get_ident())
    return True
