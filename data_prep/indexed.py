"""Megatron indexed datasets (``.bin``/``.idx``), opened only after their sizes agree with the index.

Megatron's reader trusts its files: a truncated ``.idx`` fails deep inside with an ``AttributeError``,
a truncated ``.bin`` maps fine and fails (or returns short items) only when a late item is read, and
an empty ``.bin`` cannot be memory-mapped at all. :func:`check_indexed_dataset` reads the header of
the ``.idx`` (magic, version, dtype code, sequence and document counts; then int32 lengths, int64
pointers, int64 document indices, as megatron.core's ``_IndexWriter`` writes them) and compares both
file sizes with what it describes, naming the file that is wrong.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from data_prep.errors import PrepError

_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents


@dataclass(frozen=True)
class IndexHeader:
    """What the ``.idx`` header says about a dataset."""

    sequences: int
    documents: int
    dtype_size: int


def _read_header(idx_path: str) -> IndexHeader:
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    with open(idx_path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise PrepError(f"{idx_path} is truncated ({len(raw)} bytes): not even a Megatron index header")
    magic, version, code, sequences, documents = _HEADER.unpack(raw)
    if magic != _INDEX_HEADER or version != 1:
        raise PrepError(f"{idx_path} is not a Megatron index (version 1): its header is {raw[:9]!r}")
    try:
        dtype_size = DType.size(code)
    except ValueError:
        raise PrepError(f"{idx_path} names an unknown token dtype (code {code})") from None
    return IndexHeader(sequences, documents, dtype_size)


def check_indexed_dataset(prefix: str) -> IndexHeader:
    """Raise :class:`PrepError` naming the file unless ``prefix.idx`` and ``prefix.bin`` are complete."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise PrepError(f"no dataset at {prefix} ({path} is missing)")
    header = _read_header(idx_path)
    n, d = header.sequences, header.documents
    expected_idx = _HEADER.size + 4 * n + 8 * n + 8 * d
    actual_idx = os.path.getsize(idx_path)
    if actual_idx not in (expected_idx, expected_idx + n):  # + n: Megatron's multimodal sequence modes
        raise PrepError(
            f"{idx_path} holds {actual_idx:,} bytes but its header describes {n:,} sequences in "
            f"{expected_idx:,} bytes: the index is truncated or damaged; make the dataset again"
        )
    expected_bin = 0
    if n:
        with open(idx_path, "rb") as f:
            f.seek(_HEADER.size + 4 * (n - 1))
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_HEADER.size + 4 * n + 8 * (n - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
        expected_bin = last_pointer + last_length * header.dtype_size
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise PrepError(
            f"{bin_path} holds {actual_bin:,} bytes but its index {idx_path} describes {expected_bin:,}: "
            f"the data file is {'truncated' if actual_bin < expected_bin else 'longer than its index'}; "
            "make the dataset again"
        )
    return header


def open_indexed_dataset(prefix: str) -> Any:
    """megatron.core's ``IndexedDataset`` at ``prefix``, after :func:`check_indexed_dataset`.

    An empty dataset is read without memory-mapping (an empty file cannot be mapped).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_indexed_dataset(prefix)
    return IndexedDataset(prefix, mmap=os.path.getsize(prefix + ".bin") > 0)
