"""Streaming readers: input paths, directories and globs to raw records, in a fixed order.

The parent process only reads bytes; decoding (UTF-8, JSON) and validation happen in the workers
(:mod:`data_prep.encode`), so the reader stays cheap and the order of records is the order of the
input. Memory is one line (JSON lines), one file (plain text) or one record batch (Parquet).

Formats, by file name after removing a compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.zst``):

* ``.jsonl``, ``.json``, ``.ndjson``: JSON lines, one document per line, text under ``--text-key``;
  blank lines are ignored.
* ``.parquet``, ``.pq``: Parquet, text in the column ``--text-key`` (not compressible by suffix).
* anything else: a plain UTF-8 text file, one document per file.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

from data_prep.errors import PrepError

JSONL, TEXT, PARQUET = "jsonl", "text", "parquet"
EOF = "eof"  # kind of the record that closes a file: no document, only its remaining bytes
FORMATS = ("auto", JSONL, TEXT, PARQUET)
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class Record:
    """One document before decoding.

    ``payload`` is the raw bytes of a JSON line or text file, or the ``str``/None from a Parquet
    cell; ``where`` names it for error messages (``path:line``); ``nbytes`` is how many input bytes
    it accounts for (for MB/s and the ETA; the sum over a file equals its size).
    """

    kind: str
    payload: bytes | str | None
    where: str
    nbytes: int


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk(directory: str, pattern: str | None) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or (pattern and not fnmatch(name, pattern)):
                continue
            found.append(os.path.join(root, name))
    return sorted(found)  # the same order as a sorted glob of the same files


def expand_inputs(inputs: Sequence[str], pattern: str | None = None) -> list[str]:
    """Files named by ``inputs`` (files, directories walked recursively, ``**`` globs), in order.

    ``pattern`` (e.g. ``*.py``) filters file names found in directories and globs; files named
    explicitly are always taken. Duplicates are kept once. Missing inputs are an error.
    """
    if not inputs:
        raise PrepError("no inputs given")
    out: list[str] = []
    for item in inputs:
        if _is_glob(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PrepError(f"input glob {item!r} matches nothing")
            for m in matches:
                if os.path.isdir(m):
                    out.extend(_walk(m, pattern))
                elif not pattern or fnmatch(os.path.basename(m), pattern):
                    out.append(m)
        elif os.path.isdir(item):
            out.extend(_walk(item, pattern))
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise PrepError(f"input {item} does not exist")
    out = list(dict.fromkeys(out))
    if not out:
        raise PrepError(
            f"no input files found in {', '.join(inputs)}" + (f" matching {pattern!r}" if pattern else "")
        )
    return out


def detect_format(path: str, fmt: str = "auto") -> str:
    """The format of ``path``: ``fmt`` unless it is ``auto``, else from the file name."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    if name.endswith(_JSONL_SUFFIXES):
        return JSONL
    if name.endswith(_PARQUET_SUFFIXES):
        return PARQUET
    return TEXT


class _ZstdFrames(io.RawIOBase):
    """The zstd frames of ``raw``, decompressed one after another.

    zstandard's own stream reader ends silently when a file ends inside a frame, so a truncated
    ``.zst`` would lose its tail without a word; this reader raises ``EOFError`` there, as gzip,
    bz2 and lzma do.
    """

    def __init__(self, raw: io.BufferedReader) -> None:
        import zstandard  # only .zst inputs need it

        self._raw = raw
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._new_frame()
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None
        return b"".join(out)


def _open_stream(path: str, raw: io.BufferedReader) -> io.BufferedIOBase:
    """A decompressing reader over ``raw`` (chosen by suffix); ``raw.tell()`` tracks input bytes.

    Every decompressor raises ``EOFError`` when the file ends inside compressed data.
    """
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".bz2"):
        return bz2.BZ2File(raw, mode="rb")
    if path.endswith(".xz"):
        return lzma.LZMAFile(raw, mode="rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    return raw


def _jsonl_records(path: str) -> Iterator[Record]:
    with open(path, "rb") as raw:
        stream = _open_stream(path, raw)
        seen = 0
        for lineno, line in enumerate(stream, start=1):
            pos = raw.tell()
            if not line.strip():
                continue
            yield Record(JSONL, line, f"{path}:{lineno}", pos - seen)
            seen = pos
        yield Record(EOF, None, path, raw.tell() - seen)


def _text_record(path: str) -> Iterator[Record]:
    with open(path, "rb") as raw:
        data = _open_stream(path, raw).read()
        yield Record(TEXT, data, path, raw.tell())


def _parquet_records(path: str, text_key: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise PrepError(
            f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "choose one with --text-key"
        )
    size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
    row, accounted = 0, 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            target = size * row // rows
            yield Record(PARQUET, value, f"{path}:row {row}", target - accounted)
            accounted = target
    yield Record(EOF, None, path, size - accounted)


def iter_records(paths: Sequence[str], fmt: str = "auto", text_key: str = "text") -> Iterator[Record]:
    """Records of all ``paths`` in order; records of kind ``EOF`` only carry byte counts.

    Unreadable or corrupt files raise :class:`PrepError` naming the file.
    """
    for path in paths:
        kind = detect_format(path, fmt)
        try:
            if kind == JSONL:
                yield from _jsonl_records(path)
            elif kind == PARQUET:
                yield from _parquet_records(path, text_key)
            else:
                yield from _text_record(path)
        except PrepError:
            raise
        except EOFError as e:
            raise PrepError(f"cannot read {path}: it is truncated ({e})") from e
        except Exception as e:  # OSError, gzip/zstd/arrow errors: all mean "this file cannot be read"
            raise PrepError(f"cannot read {path}: {type(e).__name__}: {e}") from e
