"""``longnet-prep tokenize``: raw corpora to one Megatron indexed dataset (.bin/.idx).

The parent streams records (:mod:`data_prep.readers`) into batches, a pool of worker processes
tokenizes them (:mod:`data_prep.encode`), and the parent writes the results *in input order* with
megatron.core's ``IndexedDatasetBuilder``: one document = one sequence = the document's tokens plus
end-of-document. At most ``2 * workers + 1`` batches are in flight, so memory does not grow with the
corpus (apart from Megatron's index: two integers per document). Batches are cut by the input alone,
so the output bytes are the same for any number of workers.

Start-up: importing megatron.core (and torch with it) takes seconds, and only the writer needs it.
The workers are forked first (they never need it, and start small), then megatron is imported in a
background thread while the first batches are read and tokenized.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import click
import numpy as np

from data_prep.atomic import atomic_outputs
from data_prep.encode import (
    EncodedBatch,
    encode_in_worker,
    init_worker,
    set_worker_state,
    transport_dtype,
)
from data_prep.errors import PrepError
from data_prep.meta import TOKENIZED, dataset_paths, meta_path, write_meta
from data_prep.progress import Progress
from data_prep.readers import Record, expand_inputs, iter_records
from data_prep.tokenizers import DEFAULT_TOKENIZER, Tokenizer, get_tokenizer

ON_ERROR = ("stop", "skip")
_MAX_REPORTED_ERRORS = 5


@dataclass
class TokenizeStats:
    """What a tokenize run read and wrote."""

    files: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty_documents: int = 0
    skipped_records: int = 0
    seconds: float = 0.0
    encoder: str = ""
    error_examples: list[str] = field(default_factory=list)


class _BackgroundImport:
    """A module imported in a daemon thread; :meth:`get` waits for it (and re-raises its error)."""

    def __init__(self, name: str) -> None:
        self._name, self._module, self._error = name, None, None
        self._thread = threading.Thread(target=self._run, name=f"import {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._module = importlib.import_module(self._name)
        except BaseException as e:  # noqa: BLE001 - handed to the caller of get()
            self._error = e

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._module


def _batches(records: Iterable[Record], max_docs: int, max_bytes: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    size = 0
    for r in records:
        batch.append(r)
        size += r.nbytes
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _start_pool(workers: int, tok: Tokenizer, text_key: str):
    """``workers`` tokenizer processes, forked on Linux (milliseconds, and they inherit the tokenizer)."""
    dtype = transport_dtype(tok.vocab_size)
    if sys.platform.startswith("linux"):
        set_worker_state(tok, text_key, dtype.name)
        return multiprocessing.get_context("fork").Pool(workers)
    initargs = (tok.describe(), tok.encoder, text_key, dtype.name)
    return multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=initargs)


def _encode_in_order(pool, batches: Iterable[list[Record]], workers: int) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, with at most ``2 * workers + 1`` batches queued
    (``pool.imap`` would read the whole input ahead of the workers)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_in_worker, (batch,)))
        if len(pending) > 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def tokenize_corpus(
    inputs: Sequence[str],
    output_prefix: str,
    *,
    tokenizer: str | dict = DEFAULT_TOKENIZER,
    text_key: str = "text",
    fmt: str = "auto",
    pattern: str | None = None,
    workers: int = 2,
    on_error: str = "stop",
    encoder: str = "auto",
    overwrite: bool = False,
    batch_docs: int = 4096,
    batch_bytes: int = 4 << 20,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: click.echo(m, err=True),
) -> TokenizeStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.meta.json``; see the module docstring.

    ``on_error='stop'`` raises :class:`PrepError` at the first bad record (naming file and line);
    ``'skip'`` leaves it out and counts it. Empty documents are always left out and counted.
    ``encoder`` picks the BPE library (see :mod:`data_prep.tokenizers`); the tokens are the same.
    """
    if workers < 1:
        raise PrepError("--workers must be at least 1")
    if on_error not in ON_ERROR:
        raise PrepError(f"--on-error must be one of {ON_ERROR}")
    tok = get_tokenizer(tokenizer, encoder)
    files = expand_inputs(inputs, pattern)
    empty_files = [f for f in files if os.path.getsize(f) == 0]
    if empty_files:
        log(f"warning: {len(empty_files)} input file(s) are empty, e.g. {empty_files[0]}")
    stats = TokenizeStats(
        files=len(files), input_bytes=sum(os.path.getsize(f) for f in files), encoder=tok.encoder
    )
    start = time.perf_counter()
    paths = dataset_paths(output_prefix)
    bin_path = output_prefix + ".bin"

    with atomic_outputs(paths, overwrite) as tmp, _start_pool(workers, tok, text_key) as pool:
        megatron = _BackgroundImport("megatron.core.datasets.indexed_dataset")  # after the fork
        builder, dtype = None, None
        bar = Progress(stats.input_bytes, "tokenize", enabled=progress)
        try:
            batches = _batches(iter_records(files, fmt, text_key), batch_docs, batch_bytes)
            for enc in _encode_in_order(pool, batches, workers):
                if builder is None:
                    indexed = megatron.get()
                    dtype = np.dtype(indexed.DType.optimal_dtype(tok.vocab_size))
                    builder = indexed.IndexedDatasetBuilder(tmp[bin_path], dtype=dtype.type)
                _write_batch(builder, enc, stats, on_error)
                bar.update(enc.nbytes, len(enc.lengths), len(enc.tokens))
        finally:
            bar.close()
            if builder is not None:
                builder.data_file.close()
        if stats.documents == 0:
            raise PrepError(
                f"no documents found in {len(files)} input file(s)"
                + (f" ({stats.empty_documents} empty)" if stats.empty_documents else "")
                + (f" ({stats.skipped_records} bad records skipped)" if stats.skipped_records else "")
            )
        builder.finalize(tmp[output_prefix + ".idx"])
        stats.seconds = time.perf_counter() - start
        meta = {
            "format": TOKENIZED,
            "tokenizer": tok.describe(),
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "inputs": list(inputs),
            "stats": asdict(stats),
        }
        write_meta(tmp[meta_path(output_prefix)], meta)
    if stats.empty_documents:
        log(f"warning: left out {stats.empty_documents} empty document(s)")
    if stats.skipped_records:
        log(f"warning: skipped {stats.skipped_records} bad record(s), e.g. {stats.error_examples[0]}")
    return stats


def _write_batch(builder, enc: EncodedBatch, stats: TokenizeStats, on_error: str) -> None:
    if enc.errors:
        if on_error == "stop":
            where, message = enc.errors[0]
            raise PrepError(f"{where}: {message} (pass --on-error skip to leave bad records out)")
        stats.skipped_records += len(enc.errors)
        room = _MAX_REPORTED_ERRORS - len(stats.error_examples)
        stats.error_examples.extend(f"{w}: {m}" for w, m in enc.errors[:room])
    pos = 0
    for n in enc.lengths.tolist():
        builder.add_document(enc.tokens[pos : pos + n], [n])
        pos += n
    stats.documents += len(enc.lengths)
    stats.tokens += len(enc.tokens)
    stats.empty_documents += enc.empty
