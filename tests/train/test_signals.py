"""Exit signals: the first one is remembered, a repeat of the same one kills the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from longnet_megatron.train.signals import ExitSignals

PROGRAM = """
import os, signal, time
from longnet_megatron.train.signals import ExitSignals
s = ExitSignals().install()
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGTERM)
print(s.received, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("survived", flush=True)
"""


def test_first_signal_is_remembered_and_a_repeat_kills():
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.stdout.split() == ["SIGUSR1"]
    assert result.returncode == -signal.SIGTERM


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    signals = ExitSignals().install()
    assert signal.getsignal(signal.SIGTERM) != before
    signals.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
