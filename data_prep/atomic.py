"""All-or-nothing outputs: write under temporary names, rename into place only when complete.

A killed run leaves only ``*.tmp`` files behind, never a dataset that looks finished: Megatron
recognises a dataset by its ``.idx`` file, and callers list that file last so it appears last. A
failed write (full disk, read-only or vanished directory) becomes one :class:`PrepError` naming the
output, with the temporary files removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

from data_prep.errors import PrepError

TMP_SUFFIX = ".tmp"


def check_outputs_free(paths: Sequence[str], overwrite: bool) -> None:
    """Fail early, before any work, when an output exists and ``overwrite`` is off."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise PrepError(f"output {existing[0]} already exists; choose another output or pass --overwrite")
    for p in paths:
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise PrepError(f"output directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise PrepError(f"output directory {parent} is not writable")


def _write_error(error: OSError, tmp: dict[str, str], outcome: str) -> PrepError:
    """One line for an OSError met while writing ``tmp``'s files (``{final: temporary}``)."""
    final = {t: p for p, t in tmp.items()}.get(error.filename)
    reason = error.strerror or str(error)
    if final is not None:
        return PrepError(f"cannot write {final}: {reason}; {outcome}")
    if error.filename is not None:
        return PrepError(f"{error.filename}: {reason}; {outcome}")
    directory = os.path.dirname(os.path.abspath(next(iter(tmp))))
    return PrepError(f"cannot write the outputs in {directory}: {reason}; {outcome}")


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str], overwrite: bool = False) -> Iterator[dict[str, str]]:
    """Yield ``{final path: temporary path}``; on success rename every file in the given order.

    On any exception the temporary files are removed and the final paths are left untouched.
    When overwriting, the old files are removed first (last path first) so that an old ``.idx``
    never sits next to a new ``.bin``.
    """
    check_outputs_free(paths, overwrite)
    tmp = {p: p + TMP_SUFFIX for p in paths}
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp.values())
        if isinstance(e, OSError):
            raise _write_error(e, tmp, "nothing was written") from e
        raise
    try:
        for p in reversed(paths):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        for p in paths:
            os.replace(tmp[p], p)
    except OSError as e:
        _remove(tmp.values())
        raise _write_error(e, tmp, "the outputs are incomplete, write them again") from e


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.remove(p)
