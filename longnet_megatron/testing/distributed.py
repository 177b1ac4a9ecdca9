"""Run a function in N CPU processes with torch.distributed (gloo) and Megatron's parallel state.

Multi-rank behaviour (tensor, pipeline and context parallelism) is tested on CPU by spawning one
process per rank::

    def check(scale):                      # module level, so it pickles by reference
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        return {"rank": tp_rank, "value": scale * tp_rank}

    results = run_distributed(check, world_size=2, layout=ParallelLayout(tp=2), args=(3,))
    # results[r] is what rank r returned

Each process initialises gloo on a free local port and, given a layout, calls
:func:`longnet_megatron.compat.enable_cpu_megatron`, initialises Megatron's ``parallel_state`` with it
and seeds Megatron's model-parallel RNG; then it runs the function and sends back its result
(anything ``torch.save`` can write: tensors, dicts, lists, numbers). A failing rank's exception comes
back as :class:`DistributedWorkerError` carrying that rank's traceback; a hung group is killed after
``timeout_s``.

Starting a process that imports Megatron costs several seconds, so tests should batch several checks
into one call rather than spawn a group per assertion.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from longnet_megatron.compat import enable_cpu_megatron
from longnet_megatron.parallel.layout import ParallelLayout, free_port, initialize_megatron_parallel

# TP = PP = CP = 1 (the default of run_distributed; frozen, so sharing one instance is safe).
_ONE_RANK_LAYOUT = ParallelLayout()


class DistributedWorkerError(RuntimeError):
    """A rank raised (its traceback is in the message), died, or the group timed out."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _to_bytes(obj: Any) -> bytes:
    # torch.save rather than the queue's own pickling: tensors then travel by value, not through
    # shared-memory handles that die with the child process.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    layout: ParallelLayout | None,
    seed: int,
    threads: int,
    results: mp.Queue,
) -> None:
    """Body of one rank: set up gloo + Megatron, run ``fn``, report its result or traceback."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=120),
        )
        torch.manual_seed(seed)
        if layout is not None:
            enable_cpu_megatron()
            initialize_megatron_parallel(layout, seed)
        payload = (rank, True, _to_bytes(fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent with its traceback
        payload = (rank, False, traceback.format_exc())
    results.put(payload)
    try:
        if layout is not None:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown failures must not mask the reported result
        pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    layout: ParallelLayout | None = _ONE_RANK_LAYOUT,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    seed: int = 1234,
    timeout_s: float = 300.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks and return the per-rank results.

    ``fn`` must be picklable (a module-level function); so must ``args`` and ``kwargs``. ``layout``
    gives Megatron's tp/pp/cp/vpp sizes; ``None`` initialises only torch.distributed (no Megatron
    import, no CPU shim: the rank starts in about a second). Raises :class:`DistributedWorkerError` with the first failing rank's traceback,
    or when a rank dies without reporting, or after ``timeout_s`` seconds.
    """
    if layout is not None and world_size % layout.model_parallel_size():
        raise ValueError(f"world_size={world_size} is not a multiple of tp*pp*cp in {layout}")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs or {}, layout, seed, threads_per_rank, results),
            # Not daemonic: ranks may start processes of their own (Megatron's dist-checkpoint
            # writer does); the finally block below reaps every rank, whatever happens.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(collected))
                    raise DistributedWorkerError(
                        f"ranks {missing} did not finish within {timeout_s} s"
                    ) from None
                dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    time.sleep(0.5)  # a rank that reported just before dying is still in the queue
                    if results.empty():
                        code = procs[dead[0]].exitcode
                        raise DistributedWorkerError(
                            f"rank {dead[0]} died with exit code {code} without reporting", rank=dead[0]
                        ) from None
                continue
            if not ok:
                raise DistributedWorkerError(f"rank {rank} failed:\n{payload}", rank=rank)
            collected[rank] = _from_bytes(payload)
    finally:
        for proc in procs:
            proc.join(timeout=10 if len(collected) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [collected[rank] for rank in range(world_size)]
