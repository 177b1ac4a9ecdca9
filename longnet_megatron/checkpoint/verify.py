"""Is a checkpoint complete and safe to load? Checked before any tensor is read.

A checkpoint is complete when Megatron's ``metadata.json``, ``common.pt`` (megatron-core 0.19+: the
``common_state`` object in the shards instead) and torch's ``.metadata`` are there and readable and
every shard file the metadata lists is at least as long as the metadata says. ``.metadata`` is a pickle, and torch's reader unpickles it with the standard unpickler, which
can run any code: it is read here through an unpickler that accepts only the classes of torch's
checkpoint metadata (:data:`ALLOWED_GLOBALS`), and loads run inside :func:`safe_loading`, where torch's
own reader uses that unpickler and every ``torch.load`` is weights-only (tensors, containers and the
few classes Megatron-Core registers as safe). docs/design.md section 6 says what is trusted.

Resumption (:func:`resume_checkpoint`) goes further: when the checkpoint ``latest`` names is missing
or incomplete it warns, naming the bad file, and falls back to the newest complete one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import megatron.core  # noqa: F401 - registers Megatron's safe globals for torch.load(weights_only=True)
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from longnet_megatron.checkpoint.errors import CheckpointError
from longnet_megatron.checkpoint.files import (
    DIST_METADATA,
    METADATA,
    checkpoint_dirs,
    marker_target,
)

log = logging.getLogger(__name__)

DCP_METADATA = ".metadata"
COMMON = "common.pt"
# megatron-core 0.19+ keeps the common state in the shards, as this object (ShardedObject.unique_key).
COMMON_STATE_KEY = ShardedObject("common_state", None, (1,), (0,)).unique_key

# Every global a torch.distributed.checkpoint ``.metadata`` pickle names (torch 2.4 - 2.13): the
# metadata dataclasses and enums, the save plan Megatron keeps there, torch.Size, dtypes, layouts.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
        if hasattr(dcp_metadata, name)
    },
    **{
        (dcp_planner.__name__, name): getattr(dcp_planner, name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem")
        if hasattr(dcp_planner, name)
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and torch dtypes."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path} names {module}.{name}, which is not a torch checkpoint metadata class: refusing "
            "to unpickle it (a crafted or foreign file can run code when unpickled)",
            "unsafe",
        )


class _AllowListedPickle:
    """The ``pickle`` module as torch's checkpoint reader sees it inside :func:`safe_loading`: its
    ``load`` is the allow-listed unpickler; everything else is the real module."""

    @staticmethod
    def load(file, **_kwargs: Any) -> Any:
        return _MetadataUnpickler(file, Path(getattr(file, "name", DCP_METADATA))).load()

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Load checkpoints inside this block: no file of a checkpoint can run code.

    torch's checkpoint reader unpickles ``.metadata`` with the standard unpickler and the byte items
    of the shards (Megatron's sharded objects: RNG states, some optimizer formats) with
    ``torch.load(weights_only=False)``. Inside the block the first goes through the allow-listed
    unpickler and every ``torch.load`` is forced to ``weights_only=True`` (torch's own
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch). A refused file is an ``unsafe`` :class:`CheckpointError`.
    """
    previous_pickle = dcp_filesystem.pickle
    previous_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    dcp_filesystem.pickle = _AllowListedPickle()
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        raise CheckpointError(
            f"a checkpoint file holds objects outside torch's weights-only allow-list: refusing to load "
            f"it ({str(e).splitlines()[0][:200]})",
            "unsafe",
        ) from e
    finally:
        dcp_filesystem.pickle = previous_pickle
        if previous_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous_env


def read_dcp_metadata(ckpt: Path) -> Any:
    """torch's checkpoint metadata of ``ckpt`` (``.metadata``), through the allow-listed unpickler."""
    path = Path(ckpt) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing: truncated checkpoint", "truncated") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}: {e}): truncated checkpoint", "truncated"
        ) from e


def _has_common_state_object(ckpt: Path) -> bool:
    """Whether the shards hold the common state (megatron-core 0.19+ writes no ``common.pt``)."""
    return COMMON_STATE_KEY in read_dcp_metadata(ckpt).state_dict_metadata


def _common_state_bytes(ckpt: Path) -> io.BytesIO:
    """The 0.19+ ``common_state`` object's bytes, read straight from its shard file at the offset the
    (allow-listed) ``.metadata`` gives: torch's own reader would unpickle them without restriction."""
    storage = read_dcp_metadata(ckpt).storage_data
    (info,) = [info for index, info in storage.items() if index.fqn == COMMON_STATE_KEY]
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{ckpt}: the common state is stored transformed (compressed?)", "foreign")
    with open(Path(ckpt) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return io.BytesIO(f.read(info.length))


def read_common(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's common (non-sharded) state, loaded with ``weights_only=True``: ``common.pt``, or
    (megatron-core 0.19+) the ``common_state`` object in the shards."""
    path = Path(ckpt) / COMMON
    if not path.is_file() and not _has_common_state_object(ckpt):
        raise CheckpointError(f"{path} is missing: truncated checkpoint", "truncated")
    try:
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        loaded = torch.load(_common_state_bytes(ckpt), map_location="cpu", weights_only=True)
        return loaded[0] if isinstance(loaded, list) else loaded  # a ShardedObject's data, as a list
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} holds objects outside torch's weights-only allow-list: refusing to load it", "unsafe"
            ) from e
        raise CheckpointError(f"{path} is unreadable ({e}): truncated checkpoint", "truncated") from e
    except Exception as e:  # noqa: BLE001 - a short zip, a bad CRC: the file is damaged
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}: {e}): truncated checkpoint", "truncated"
        ) from e


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of a checkpoint, or a ``truncated`` :class:`CheckpointError` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing: truncated checkpoint", "truncated") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): truncated {what}?", "truncated") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, not a JSON object", "foreign")
    return data


def verify_checkpoint(ckpt: Path, *, load_common: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the file unless ``ckpt`` is a complete torch_dist checkpoint.

    Reads ``metadata.json``, ``.metadata`` (allow-listed), ``longnet.json`` when present, and
    (``load_common``) ``common.pt``; checks every shard's size against the metadata. No tensor is read.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist", "missing")
    meta = read_json(ckpt / DIST_METADATA, "checkpoint")
    backend = meta.get("sharded_backend")
    if backend != "torch_dist":
        raise CheckpointError(
            f"{ckpt}: sharded backend {backend!r}; only torch_dist checkpoints (Megatron's default) are "
            "supported",
            "foreign",
        )
    dcp_meta = read_dcp_metadata(ckpt)
    if not (ckpt / COMMON).is_file() and COMMON_STATE_KEY not in dcp_meta.state_dict_metadata:
        raise CheckpointError(f"{ckpt / COMMON} is missing: truncated checkpoint", "truncated")
    storage = dcp_meta.storage_data
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: truncated checkpoint", "truncated")
        if file.stat().st_size < size:
            raise CheckpointError(
                f"{file} has {file.stat().st_size} bytes, its metadata needs {size}: truncated checkpoint",
                "truncated",
            )
    if (ckpt / METADATA).exists():
        read_json(ckpt / METADATA, "checkpoint")
    if load_common:
        read_common(ckpt)


def newest_complete(directory: Path, skip: tuple[Path, ...] = ()) -> Path | None:
    """The complete checkpoint of the highest step in ``directory`` (not in ``skip``), or None."""
    for ckpt in reversed(checkpoint_dirs(directory)):
        if ckpt in skip:
            continue
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            log.warning("skipping %s: %s", ckpt, e)
            continue
        return ckpt
    return None


def resume_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint a run resumes from: what ``latest`` names if it is complete, else the newest
    complete one (with a warning naming what was wrong); None when ``directory`` holds none.

    Raises :class:`CheckpointError` when checkpoints exist but none is complete (nothing to resume
    from, and starting afresh would silently throw the run away).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = checkpoint_dirs(directory)
    problem = None
    try:
        target = marker_target(directory)
    except CheckpointError as e:
        target, problem = None, str(e)
    if target is not None:
        marker, name = target
        ckpt = directory / name
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            problem = f"{marker} names {name}, which cannot be resumed from: {e}"
    if not candidates:
        if problem:
            raise CheckpointError(f"{problem}; and {directory} holds no other checkpoint", "truncated")
        return None
    fallback = newest_complete(directory)
    if fallback is None:
        raise CheckpointError(
            f"{directory} holds checkpoints ({', '.join(p.name for p in candidates)}) but none is complete"
            + (f" ({problem})" if problem else ""),
            "truncated",
        )
    log.warning(
        "%s; resuming from the newest complete checkpoint %s instead",
        problem or f"{directory} has checkpoints but no latest marker",
        fallback,
    )
    return fallback
