"""Helpers die with the trainer: a watchdog that ends them when it dies without cleaning up.

Megatron's checkpoint writer starts a multiprocessing Manager, DataLoader workers are processes, and
they hold the exit signals blocked (:mod:`.signals`). A trainer that exits normally ends them; one
killed outright (``kill -9``, the OOM killer) cannot, and its helpers would live on, each holding
hundreds of MB. The watchdog is a small forked process that notes the trainer's descendants every
second and, once the trainer is gone, kills the ones it noted (checked by creation time, so a reused
pid is never hit), then exits.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from longnet_megatron.train.signals import EXIT_SIGNALS


def _watch(trainer_pid: int, interval_s: float) -> None:
    """The watchdog's body (in the forked child): never returns."""
    for sig in (*EXIT_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # Slurm signals every process; the watchdog leaves on its own
    me = os.getpid()
    known: dict[int, float] = {}
    try:
        trainer = psutil.Process(trainer_pid)
        while os.getppid() == trainer_pid:
            try:
                known = {p.pid: p.create_time() for p in trainer.children(recursive=True) if p.pid != me}
            except psutil.Error:
                pass
            time.sleep(interval_s)
        for pid, created in known.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()
            except psutil.Error:
                pass  # already gone
    finally:
        os._exit(0)


def start_reaper(interval_s: float = 1.0) -> int:
    """Fork the watchdog for this process; returns its pid (the parent carries on at once)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _watch(parent, interval_s)
    return pid
