"""Where checkpoints live on disk: directory names, the ``latest`` marker, atomic writes.

A checkpoint directory (the trainer's ``checkpoint.dir``; ``run_dir/checkpoints`` by default)::

    iter_0000100/          one complete Megatron dist checkpoint (metadata.json, common.pt, .metadata,
      longnet.json         __R_S.distcp shards) plus this project's record (:mod:`.record`)
    iter_0000200/
    iter_0000300.tmp/      a save in progress (renamed to iter_0000300 when every rank has finished)
    latest                 "iter_0000200": written last, atomically, after the save completed

Megatron-LM's ``latest_checkpointed_iteration.txt`` (a bare step number) is read as well.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from longnet_megatron.checkpoint.errors import CheckpointError

LATEST = "latest"
MEGATRON_LM_LATEST = "latest_checkpointed_iteration.txt"
LATEST_MARKERS = (LATEST, MEGATRON_LM_LATEST)
METADATA = "longnet.json"  # this project's record inside each checkpoint
DIST_METADATA = "metadata.json"  # megatron.core.dist_checkpointing's own marker of a checkpoint
CHECKPOINTS_SUBDIR = "checkpoints"  # the trainer's default checkpoint.dir inside a run directory
TMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    """``iter_0000100``: Megatron-LM's checkpoint directory name (a non-negative step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step {step!r} must be an integer >= 0")
    return f"iter_{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name (``iter_0000100`` -> 100), None for anything else."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half)."""
    path = str(path)
    tmp = f"{path}{TMP_SUFFIX}.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_latest(directory: str | os.PathLike, name: str) -> None:
    """Point ``directory/latest`` at checkpoint ``name`` (atomically)."""
    write_atomic(os.path.join(directory, LATEST), name + "\n")


def checkpoint_dirs(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (``iter_N``, not ``.tmp``) in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step_of(p.name), p) for p in directory.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def partial_saves(directory: str | os.PathLike) -> list[Path]:
    """Saves that never completed (``iter_N.tmp``) in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.name.endswith(TMP_SUFFIX) and step_of(p.name[:-4]) is not None
    )


def marker_target(directory: str | os.PathLike) -> tuple[Path, str] | None:
    """``(marker path, checkpoint name)`` of the first marker in ``directory``; None without one.

    Raises :class:`CheckpointError` for an empty or unreadable marker (its path in the message).
    """
    directory = Path(directory)
    for marker in LATEST_MARKERS:
        path = directory / marker
        if not path.is_file():
            continue
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} cannot be read ({e})", "truncated") from e
        if not text:
            raise CheckpointError(f"{path} is empty: it names no checkpoint", "truncated")
        return path, checkpoint_name(int(text)) if text.isdigit() else text
    return None


def checkpoint_directory_of(path: str | os.PathLike) -> Path:
    """The directory holding the checkpoints of ``path``: a run directory's ``checkpoints/``, or itself."""
    path = Path(path)
    if not any((path / m).is_file() for m in LATEST_MARKERS) and (path / CHECKPOINTS_SUBDIR).is_dir():
        return path / CHECKPOINTS_SUBDIR
    return path


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint ``path`` means: itself, or the one its (or its ``checkpoints/``) marker names.

    Strict: a dangling or empty marker is a :class:`CheckpointError` naming it (resumption falls back
    to an older checkpoint instead, see :func:`~longnet_megatron.checkpoint.verify.resume_checkpoint`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", "missing")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a Megatron dist checkpoint directory", "foreign")
    if (path / DIST_METADATA).exists():
        return path
    directory = checkpoint_directory_of(path)
    target = marker_target(directory)
    if target is None:
        raise CheckpointError(
            f"{path} is not a Megatron dist checkpoint (no {DIST_METADATA}) nor a run directory with a "
            f"{' or '.join(LATEST_MARKERS)} marker",
            "foreign",
        )
    marker, name = target
    ckpt = directory / name
    if not ckpt.is_dir():
        raise CheckpointError(
            f"{marker} names {name}, which does not exist in {directory} (truncated copy?)", "truncated"
        )
    return ckpt
