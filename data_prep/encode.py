"""Worker side of ``longnet-prep tokenize``: decode, validate and tokenize one batch of records.

Runs in worker processes (it imports neither megatron nor torch, so workers start fast). A batch
comes back as one flat token array plus per-document lengths, which pickles as two buffers instead
of millions of Python ints. Bad records are reported, not raised, so the parent decides in input
order whether to stop or skip, and the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_prep.readers import EOF, JSONL, PARQUET, Record
from data_prep.tokenizers import Tokenizer, get_tokenizer


@dataclass
class EncodedBatch:
    """Tokens of the good documents of a batch (each followed by end-of-document), in order."""

    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)  # (where, message)
    empty: int = 0
    nbytes: int = 0


class RecordError(ValueError):
    """A record that is not a usable document; the message says why."""


def _check_unicode(text: str) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"invalid Unicode (lone surrogate) at character {e.start}") from None
    return text


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}: {data[e.start : e.start + 4]!r}") from None


def record_text(record: Record, text_key: str) -> str:
    """The document text of a record, or :class:`RecordError`."""
    if record.kind == JSONL:
        line = _utf8(record.payload)
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        if text_key not in obj:
            keys = ", ".join(list(obj)[:8]) or "none"
            raise RecordError(f"missing text key {text_key!r} (keys: {keys}); choose one with --text-key")
        text = obj[text_key]
        if not isinstance(text, str):
            raise RecordError(f"text key {text_key!r} holds {type(text).__name__}, not a string")
        return _check_unicode(text)
    if record.kind == PARQUET:
        if not isinstance(record.payload, str):
            raise RecordError(f"text column holds {type(record.payload).__name__}, not a string")
        return record.payload
    return _utf8(record.payload)


_worker: dict[str, Any] = {}


def set_worker_state(tokenizer: Tokenizer, text_key: str, dtype: str) -> None:
    """What :func:`encode_in_worker` uses; set before forking, workers inherit it."""
    _worker.update(tokenizer=tokenizer, text_key=text_key, dtype=np.dtype(dtype))


def init_worker(tokenizer_description: dict[str, Any], encoder: str, text_key: str, dtype: str) -> None:
    """Pool initializer for spawned workers: build the tokenizer once per process."""
    set_worker_state(get_tokenizer(tokenizer_description, encoder), text_key, dtype)


def transport_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: what a batch travels in to the parent (the
    writer casts to the dtype on disk)."""
    return np.min_scalar_type(vocab_size - 1)


def encode_records(
    records: list[Record], tokenizer: Tokenizer, text_key: str, dtype: np.dtype
) -> EncodedBatch:
    """Decode, validate and tokenize ``records``, appending end-of-document to each document."""
    texts: list[str] = []
    errors: list[tuple[str, str]] = []
    empty = 0
    for r in records:
        if r.kind == EOF:
            continue
        try:
            text = record_text(r, text_key)
        except RecordError as e:
            errors.append((r.where, str(e)))
            continue
        if text:
            texts.append(text)
        else:
            empty += 1
    ids = tokenizer.encode_batch(texts)
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    pieces = [piece for x in ids for piece in (x, eod)]
    tokens = np.concatenate(pieces, dtype=dtype, casting="unsafe") if pieces else np.empty(0, dtype)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    return EncodedBatch(tokens, lengths, errors, empty, sum(r.nbytes for r in records))


def encode_in_worker(records: list[Record]) -> EncodedBatch:
    """:func:`encode_records` with the tokenizer of this worker process."""
    return encode_records(records, _worker["tokenizer"], _worker["text_key"], _worker["dtype"])
