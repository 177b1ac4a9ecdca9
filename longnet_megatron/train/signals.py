"""Stop cleanly on SLURM's warning signals: checkpoint at the next step boundary, then exit to be requeued.

SLURM sends SIGUSR1 (``#SBATCH --signal=USR1@300``: 300 s before the time limit) or SIGTERM
(preemption, ``scancel``). The handler only sets a flag; the trainer checks it after every step,
agrees on it over all ranks (a signal may reach the ranks at different steps), saves a checkpoint and
exits with :data:`REQUEUE_EXIT_CODE`, on which ``launch/pretrain.sh`` runs ``scontrol requeue``.
A second signal of the same kind kills the process at once.
"""

from __future__ import annotations

import os
import signal
import types

import torch
import torch.distributed as dist

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Distinct from
# timeout(1)'s 124 and from the 128+N of a process killed by signal N.
REQUEUE_EXIT_CODE = 75
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignals:
    """Remembers SIGTERM / SIGUSR1 instead of dying on them."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._seen: set[int] = set()
        self._previous: dict[int, object] = {}

    def install(self) -> ExitSignals:
        for sig in EXIT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signum in self._seen:
            # The same signal again: the graceful path is not getting there (e.g. stuck in I/O); die now.
            # (A SIGTERM after SIGUSR1 is SLURM's time limit arriving: keep saving until SIGKILL.)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._seen.add(signum)
        self.received = self.received or signal.Signals(signum).name

    def any_rank_received(self, device: torch.device) -> bool:
        """Whether any rank has received a signal (a collective: call it on every rank each step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
