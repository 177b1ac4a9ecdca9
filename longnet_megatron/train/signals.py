"""Stop cleanly on Slurm's exit signals: checkpoint at the next step boundary, then exit to be requeued.

Slurm sends SIGUSR1 (``#SBATCH --signal=USR1@300``: 300 s before the time limit, or
``scancel --signal=USR1``) and SIGTERM (the time limit, preemption) to *every* process of the job step,
the trainer's helpers included, and SIGTERM at the time limit twice (from slurmstepd, and forwarded
by srun). So the trainer blocks both signals in its main thread before it starts anything: every
thread and process started afterwards inherits the blocked mask (through fork and exec), so
Megatron's checkpoint writers (the multiprocessing Manager of ``FileSystemWriterAsync``, its forked
write workers), DataLoader workers and the rest keep running until the checkpoint is written. The
trainer collects the pending signals after every step (:meth:`ExitSignals.any_rank_received`, agreed
over all ranks: a signal may reach the ranks at different steps), saves a checkpoint and exits with
:data:`REQUEUE_EXIT_CODE`, on which ``launch/pretrain.sh`` runs ``scontrol requeue``. Repeats are
ignored; Slurm's SIGKILL ends a save that overruns its KillWait.
"""

from __future__ import annotations

import signal
import types
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: longnet-train holds the signals before that
    import torch

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Distinct from
# timeout(1)'s 124 and from the 128+N of a process killed by signal N.
REQUEUE_EXIT_CODE = 75
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def hold_exit_signals() -> None:
    """Block SIGTERM / SIGUSR1 in this thread: they wait, pending, until :class:`ExitSignals` reads them.

    ``python -m longnet_megatron.train`` calls it before its imports, ``longnet-train`` first thing,
    so a signal during start-up (imports, process groups, resuming) is answered after start-up
    instead of killing the process.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)


def release_exit_signals() -> None:
    """Undo :func:`hold_exit_signals` (a run without signal handling dies on them as usual)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, EXIT_SIGNALS)


class ExitSignals:
    """Remembers the first SIGTERM / SIGUSR1 instead of dying on it; children inherit them blocked."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous_handlers: dict[int, object] = {}
        self._previous_mask: set[signal.Signals] | None = None

    def install(self) -> ExitSignals:
        """Block the signals in this (the main) thread and collect any that arrived while held."""
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)
        # CPython's resource tracker (started by the first spawned process, e.g. Megatron's Manager)
        # unblocks SIGINT and SIGTERM in its caller once it runs: start it now and block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)
        # Threads started before install() may not block them: a signal delivered there lands here.
        for sig in EXIT_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._handle)
        self.poll()
        return self

    def uninstall(self) -> None:
        self.poll()  # pending signals are consumed, not delivered to the restored handlers
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None

    def poll(self) -> str | None:
        """Take the pending signals; the first signal's name, or None."""
        signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)  # in case a library unblocked them
        while pending := signal.sigpending() & set(EXIT_SIGNALS):
            self._record(signal.sigwait(pending))  # returns at once: the signal is pending
        return self.received

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        self.received = self.received or signal.Signals(signum).name

    def any_rank_received(self, device: torch.device) -> bool:
        """Whether any rank has received a signal (a collective: call it on every rank each step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.poll() else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
