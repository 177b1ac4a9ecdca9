"""Helpers die with the trainer: a watchdog that ends them when it dies without cleaning up.

Megatron's checkpoint writer starts a multiprocessing Manager, DataLoader workers are processes, and
they hold the exit signals blocked (:mod:`.signals`). A trainer that exits normally ends them; one
killed outright (``kill -9``, the OOM killer) cannot, and its helpers would live on, each holding
hundreds of MB. The watchdog is a small forked process that notes the trainer's descendants every
second and, once the trainer is gone, kills the ones it noted and their descendants (checked by
creation time, so a reused pid is never hit), then exits. A process forked between two looks (a
Manager started for one checkpoint, just before the kill) would be missed, so every fork of the
trainer and of its forked descendants also announces its pid to the watchdog through a pipe, from the
child, before the child runs anything else.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import time

import psutil

from longnet_megatron.train.signals import EXIT_SIGNALS

_PID = struct.Struct("=i")
_LAST_WORDS_S = 0.2  # after the trainer's death: time for a child forked at that moment to announce itself


def _read_announced(fd: int) -> list[int]:
    """Pids written to the watchdog's pipe so far (non-blocking)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    usable = len(data) - len(data) % _PID.size
    return [pid for (pid,) in _PID.iter_unpack(data[:usable])]


def _note(known: dict[int, float], pids) -> None:
    """Add ``pids`` not seen before, with their creation times (the identity checked at kill time)."""
    for pid in pids:
        if pid not in known:
            try:
                known[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                pass  # already gone


def _exit_fd(pid: int) -> list[int]:
    """A descriptor that becomes readable when ``pid`` exits (Linux pidfd), or none (then: polling)."""
    try:
        return [os.pidfd_open(pid)]
    except (AttributeError, OSError):
        return []


def _watch(trainer_pid: int, interval_s: float, announced_fd: int) -> None:
    """The watchdog's body (in the forked child): never returns."""
    for sig in (*EXIT_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # Slurm signals every process; the watchdog leaves on its own
    me = os.getpid()
    known: dict[int, float] = {}
    try:
        trainer = psutil.Process(trainer_pid)
        wake = [announced_fd, *_exit_fd(trainer_pid)]  # an announcement or the trainer's end
        next_look = 0.0
        while os.getppid() == trainer_pid:
            if time.monotonic() >= next_look:
                known = {pid: created for pid, created in known.items() if psutil.pid_exists(pid)}
                try:
                    _note(known, (p.pid for p in trainer.children(recursive=True) if p.pid != me))
                except psutil.Error:
                    pass
                next_look = time.monotonic() + interval_s
            _note(known, _read_announced(announced_fd))
            select.select(wake, [], [], min(interval_s, 1.0))
        time.sleep(_LAST_WORDS_S)
        _note(known, _read_announced(announced_fd))
        victims = []
        for pid, created in known.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    victims += [process, *process.children(recursive=True)]
            except psutil.Error:
                pass  # already gone
        for process in victims:
            try:
                process.kill()
            except psutil.Error:
                pass
    finally:
        os._exit(0)


def start_reaper(interval_s: float = 1.0) -> int:
    """Fork the watchdog for this process; returns its pid (the parent carries on at once).

    From then on every fork of this process (and of its forked descendants) writes the child's pid
    to the watchdog first; a full pipe is skipped (the periodic look still sees the child).
    """
    parent = os.getpid()
    read_fd, write_fd = os.pipe()  # not inherited across exec; fork children keep the write end
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        _watch(parent, interval_s, read_fd)
    os.close(read_fd)
    os.set_blocking(write_fd, False)

    def announce() -> None:
        try:
            os.write(write_fd, _PID.pack(os.getpid()))
        except OSError:
            pass  # a full pipe or a watchdog already gone: the periodic look remains

    os.register_at_fork(after_in_child=announce)
    return pid
