"""``longnet-prep tokenize``: raw corpora to one Megatron indexed dataset (.bin/.idx).

The parent streams records (:mod:`data_prep.readers`) into batches, a pool of worker processes
tokenizes them (:mod:`data_prep.encode`), and the parent writes the results *in input order* with
megatron.core's ``IndexedDatasetBuilder``: one document = one sequence = the document's tokens plus
end-of-document. At most ``2 * workers + 1`` batches are in flight, so memory does not grow with the
corpus (apart from Megatron's index: two integers per document). Batches are cut by the input alone,
so the output bytes are the same for any number of workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import click
import numpy as np

from data_prep.atomic import atomic_outputs
from data_prep.encode import EncodedBatch, encode_in_worker, init_worker, set_worker_state
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
    error_examples: list[str] = field(default_factory=list)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron reads for this vocabulary (uint16 below 65500, else int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return np.dtype(DType.optimal_dtype(vocab_size))


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


def _encode_in_order(
    batches: Iterable[list[Record]], workers: int, tok: Tokenizer, text_key: str, dtype: np.dtype
) -> Iterator[EncodedBatch]:
    """Encoded batches in input order from a pool of ``workers``, with at most ``2 * workers + 1``
    batches queued (``pool.imap`` would read the whole input ahead of the workers)."""
    if sys.platform.startswith("linux"):
        # fork: workers start in milliseconds and inherit the tokenizer (they never touch torch).
        set_worker_state(tok, text_key, dtype.name)
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        initargs = (tok.describe(), text_key, dtype.name)
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=initargs)
    with pool:
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
    overwrite: bool = False,
    batch_docs: int = 4096,
    batch_bytes: int = 4 << 20,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: click.echo(m, err=True),
) -> TokenizeStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.meta.json``; see the module docstring.

    ``on_error='stop'`` raises :class:`PrepError` at the first bad record (naming file and line);
    ``'skip'`` leaves it out and counts it. Empty documents are always left out and counted.
    """
    if workers < 1:
        raise PrepError("--workers must be at least 1")
    if on_error not in ON_ERROR:
        raise PrepError(f"--on-error must be one of {ON_ERROR}")
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    files = expand_inputs(inputs, pattern)
    empty_files = [f for f in files if os.path.getsize(f) == 0]
    if empty_files:
        log(f"warning: {len(empty_files)} input file(s) are empty, e.g. {empty_files[0]}")
    stats = TokenizeStats(files=len(files), input_bytes=sum(os.path.getsize(f) for f in files))
    start = time.perf_counter()
    paths = dataset_paths(output_prefix)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    with atomic_outputs(paths, overwrite) as tmp:
        builder = IndexedDatasetBuilder(tmp[output_prefix + ".bin"], dtype=dtype.type)
        bar = Progress(stats.input_bytes, "tokenize", enabled=progress)
        try:
            batches = _batches(iter_records(files, fmt, text_key), batch_docs, batch_bytes)
            results = _encode_in_order(batches, workers, tok, text_key, dtype)
            with contextlib.closing(results):  # stops the pool at once on an error
                for enc in results:
                    _write_batch(builder, enc, stats, on_error)
                    bar.update(enc.nbytes, len(enc.lengths), len(enc.tokens))
        finally:
            bar.close()
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
