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


def describe_error(error: BaseException) -> str:
    """A failed write in one line: its innermost OS error when there is one (what a user can act on:
    disk full, permissions), else the exception itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror} ({seen.filename})" if seen.filename else seen.strerror
        # torch.distributed.checkpoint's CheckpointException carries each rank's (exception, trace).
        failures = getattr(seen, "failures", None)
        if isinstance(failures, dict) and failures:
            return describe_error(next(iter(failures.values()))[0])
        seen = seen.__cause__ or seen.__context__
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]
