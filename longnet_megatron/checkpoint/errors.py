"""The one error type for checkpoints and export folders that cannot be used.

The command-line tools print it as one line (``<kind> checkpoint: <message>``); the message names the
path and what is wrong with it.
"""

from __future__ import annotations

KINDS = ("missing", "truncated", "mismatched", "foreign", "unsafe", "unwritable")


class CheckpointError(ValueError):
    """A checkpoint or export folder that cannot be read or written; the message names the path.

    ``kind``: "missing" (not there), "truncated" (incomplete files), "mismatched" (not the model or
    layout asked for), "foreign" (not written by longnet-megatron), "unsafe" (a pickle naming code
    outside the allow-list), "unwritable" (a save that failed: disk full, permissions).
    """

    def __init__(self, message: str, kind: str = "foreign") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown CheckpointError kind {kind!r}; one of {KINDS}")
        super().__init__(message)
        self.kind = kind
