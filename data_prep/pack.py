"""``longnet-prep pack``: tokenized documents to fixed sequences of L+1 tokens, split train/valid/test.

Documents (each already ending in end-of-document) are shuffled with a seed, split by ratio at
document level (no document is in two splits), then concatenated in that order and cut into
sequences of exactly L+1 tokens, so a document may continue from one sequence into the next.

Policies (see docs/data.md):

* ``--long-docs`` for a document longer than L+1 tokens (it cannot fit one sequence):
  ``split`` (default) keeps it whole across consecutive sequences; ``truncate`` keeps its first L
  tokens plus end-of-document; ``drop`` leaves it out.
* ``--tail`` for the last, partial sequence of each split: ``drop`` (default) leaves its tokens out;
  ``pad`` fills it with end-of-document tokens (marked as their own segment in the boundaries).

Per split the output is ``<out>_<split>.bin/.idx`` (one Megatron sequence and document per packed
sequence), ``<out>_<split>.boundaries.bin/.idx`` (an int32 indexed dataset whose item j lists the
positions in packed sequence j where a document segment starts; 0 is always first), and
``<out>_<split>.meta.json``; ``<out>.pack.json`` summarises the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.atomic import atomic_outputs
from data_prep.errors import PrepError
from data_prep.indexed import open_indexed_dataset
from data_prep.meta import BOUNDARIES, PACKED, TOKENIZED, dataset_paths, meta_path, read_meta, write_meta
from data_prep.progress import Progress

SPLITS = ("train", "valid", "test")
TAIL_POLICIES = ("drop", "pad")
LONG_DOC_POLICIES = ("split", "truncate", "drop")
DEFAULT_SEQ_LENGTH = 1 << 20
MAX_SEQ_LENGTH = int(np.iinfo(np.int32).max) - 2  # L+1 and the int32 segment starts must fit int32


@dataclass
class SplitStats:
    """Token accounting of one split: tokens_out = tokens_in - dropped - truncated - tail + pad."""

    documents: int = 0
    sequences: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    long_documents: int = 0
    dropped_long_tokens: int = 0
    truncated_tokens: int = 0
    tail_tokens_dropped: int = 0
    pad_tokens: int = 0


def summary_path(prefix: str) -> str:
    return prefix + ".pack.json"


def split_prefix(prefix: str, split: str) -> str:
    return f"{prefix}_{split}"


def boundaries_prefix(prefix: str) -> str:
    return prefix + ".boundaries"


def parse_split(split: str) -> list[float]:
    """``"98,1,1"`` (1 to 3 finite, non-negative weights with a positive sum) to three weights."""
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise PrepError(f"--split {split!r}: expected comma-separated numbers like 98,1,1") from None
    if (
        not 1 <= len(weights) <= 3
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or sum(weights) <= 0
    ):
        raise PrepError(
            f"--split {split!r}: expected 1 to 3 finite, non-negative weights with a positive sum"
        )
    return weights + [0.0] * (3 - len(weights))


def sequences_from(lengths: np.ndarray, full: int, tail: str, long_docs: str) -> int:
    """How many sequences of ``full`` tokens documents of ``lengths`` make under the policies."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if long_docs == "drop":
        lengths = lengths[lengths <= full]
    elif long_docs == "truncate":
        lengths = np.minimum(lengths, full)
    tokens = int(lengths.sum())
    return -(-tokens // full) if tail == "pad" else tokens // full


def split_documents(order: np.ndarray, weights: Sequence[float]) -> list[np.ndarray]:
    """Cut ``order`` into consecutive train/valid/test parts proportional to ``weights``."""
    cum = np.cumsum(weights) / sum(weights)
    bounds = np.round(cum * len(order)).astype(np.int64)
    return np.split(order, bounds[:-1])


class SequencePacker:
    """Concatenates documents and emits every full sequence of ``length`` tokens with its segment starts."""

    def __init__(self, length: int, dtype: np.dtype, emit: Callable[[np.ndarray, np.ndarray], None]) -> None:
        self.length = length
        self._buf = np.empty(length, dtype=dtype)
        self._fill = 0
        self._starts: list[int] = []
        self._emit = emit

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            self._starts.append(self._fill)  # a document starts here, or continues at position 0
            n = min(self.length - self._fill, len(tokens) - pos)
            self._buf[self._fill : self._fill + n] = tokens[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == self.length:
                self._flush()

    def finish(self, tail: str, pad_id: int) -> tuple[int, int]:
        """Apply the tail policy; returns (tail tokens dropped, pad tokens added)."""
        if self._fill == 0:
            return 0, 0
        if tail == "drop":
            dropped, self._fill, self._starts = self._fill, 0, []
            return dropped, 0
        pad = self.length - self._fill
        self._starts.append(self._fill)
        self._buf[self._fill :] = pad_id
        self._fill = self.length
        self._flush()
        return 0, pad

    def _flush(self) -> None:
        self._emit(self._buf, np.asarray(self._starts, dtype=np.int32))
        self._fill, self._starts = 0, []


def _load_inputs(inputs: Sequence[str]):
    if not inputs:
        raise PrepError("no input datasets given")
    metas = [read_meta(p) for p in inputs]
    for p, m in zip(inputs, metas):
        if m.get("format") != TOKENIZED:
            raise PrepError(f"{p} is not a dataset made by `longnet-prep tokenize` (or merge)")
        if m["tokenizer"] != metas[0]["tokenizer"] or m["dtype"] != metas[0]["dtype"]:
            raise PrepError(f"{p} uses another tokenizer than {inputs[0]}; pack datasets of one tokenizer")
    return [open_indexed_dataset(p) for p in inputs], metas[0]


def pack_datasets(
    inputs: Sequence[str],
    output_prefix: str,
    *,
    seq_length: int = DEFAULT_SEQ_LENGTH,
    seed: int = 1234,
    split: str = "98,1,1",
    tail: str = "drop",
    long_docs: str = "split",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, SplitStats]:
    """Pack the documents of ``inputs`` into sequences of ``seq_length + 1`` tokens; see the module docs."""
    if not 1 <= seq_length <= MAX_SEQ_LENGTH:
        raise PrepError(f"--seq-length must be between 1 and {MAX_SEQ_LENGTH}")
    if seed < 0:
        raise PrepError("--seed must be a non-negative integer")
    if tail not in TAIL_POLICIES or long_docs not in LONG_DOC_POLICIES:
        raise PrepError(f"--tail must be one of {TAIL_POLICIES}, --long-docs one of {LONG_DOC_POLICIES}")
    weights = parse_split(split)
    datasets, meta = _load_inputs(inputs)
    dtype, eod = np.dtype(meta["dtype"]), int(meta["eod_id"])
    owner = np.concatenate([np.full(len(d), i, dtype=np.int32) for i, d in enumerate(datasets)])
    local = np.concatenate([np.arange(len(d), dtype=np.int64) for d in datasets])
    order = np.random.default_rng(seed).permutation(len(local))
    parts = split_documents(order, weights)
    full = seq_length + 1
    if weights[0] > 0:
        lengths = np.concatenate([d.sequence_lengths for d in datasets])[parts[0]]
        if sequences_from(lengths, full, tail, long_docs) == 0:
            raise PrepError(
                f"the train split would hold no sequence of L+1 = {full:,} tokens: its {len(lengths):,} "
                f"documents hold {int(lengths.sum()):,} tokens (--long-docs {long_docs}, --tail {tail}); "
                "lower --seq-length, add data, or pass --tail pad"
            )

    active = [(s, docs) for s, docs, w in zip(SPLITS, parts, weights) if w > 0]
    paths = [
        path
        for s, _ in active
        for path in dataset_paths(boundaries_prefix(split_prefix(output_prefix, s)))
        + dataset_paths(split_prefix(output_prefix, s))[:-1]
    ]
    markers = [split_prefix(output_prefix, s) + ".idx" for s, _ in active]
    paths += [summary_path(output_prefix)] + markers
    stats: dict[str, SplitStats] = {}
    total_bytes = sum(int(d.sequence_lengths.sum()) * d.index.dtype_size for d in datasets)
    start = time.perf_counter()
    with atomic_outputs(paths, overwrite) as tmp:
        bar = Progress(total_bytes, "pack", enabled=progress)
        try:
            for s, docs in active:
                documents = (datasets, owner[docs], local[docs])
                stats[s] = _pack_split(
                    documents, tmp, split_prefix(output_prefix, s), dtype, full, eod, tail, long_docs, bar
                )
                _write_split_meta(tmp, split_prefix(output_prefix, s), meta, seq_length, s, stats[s])
        finally:
            bar.close()
        summary = {
            "format": PACKED,
            "seq_length": seq_length,
            "sequence_tokens": full,
            "seed": seed,
            "split": weights,
            "tail": tail,
            "long_docs": long_docs,
            "inputs": list(inputs),
            "tokenizer": meta["tokenizer"],
            "seconds": time.perf_counter() - start,
            "splits": {s: asdict(st) for s, st in stats.items()},
        }
        with open(tmp[summary_path(output_prefix)], "w") as f:
            json.dump(summary, f, indent=2)
    return stats


def _pack_split(
    documents,
    tmp: dict[str, str],
    prefix: str,
    dtype: np.dtype,
    full: int,
    eod: int,
    tail: str,
    long_docs: str,
    bar,
) -> SplitStats:
    """Pack one split's documents into ``tmp``'s files.

    ``documents`` is ``(datasets, owner, index)``: document k is ``datasets[owner[k]][index[k]]``
    (arrays, not a list of pairs: a billion documents must not become a billion tuples).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    datasets, owner, index = documents
    st = SplitStats(documents=len(index))
    data = IndexedDatasetBuilder(tmp[prefix + ".bin"], dtype=dtype.type)
    bounds = IndexedDatasetBuilder(tmp[boundaries_prefix(prefix) + ".bin"], dtype=np.int32)

    def emit(seq: np.ndarray, starts: np.ndarray) -> None:
        data.add_document(seq, [len(seq)])
        bounds.add_document(starts, [len(starts)])
        st.sequences += 1

    packer = SequencePacker(full, dtype, emit)
    for o, i in zip(owner, index):
        tokens = datasets[int(o)][int(i)]
        st.tokens_in += len(tokens)
        bar.update(tokens.nbytes, 1, len(tokens))
        if len(tokens) > full:
            st.long_documents += 1
            if long_docs == "drop":
                st.dropped_long_tokens += len(tokens)
                continue
            if long_docs == "truncate":
                st.truncated_tokens += len(tokens) - full
                tokens = np.concatenate([tokens[: full - 1], np.array([eod], dtype=tokens.dtype)])
        packer.add(tokens)
    st.tail_tokens_dropped, st.pad_tokens = packer.finish(tail, eod)
    st.tokens_out = st.sequences * full
    data.finalize(tmp[prefix + ".idx"])
    bounds.finalize(tmp[boundaries_prefix(prefix) + ".idx"])
    write_meta(tmp[meta_path(boundaries_prefix(prefix))], {"format": BOUNDARIES, "of": prefix})
    return st


def _write_split_meta(
    tmp: dict[str, str], prefix: str, meta: dict, seq_length: int, split: str, st: SplitStats
) -> None:
    write_meta(
        tmp[meta_path(prefix)],
        {
            "format": PACKED,
            "split": split,
            "seq_length": seq_length,
            "tokenizer": meta["tokenizer"],
            "dtype": meta["dtype"],
            "vocab_size": meta["vocab_size"],
            "eod_id": meta["eod_id"],
            "stats": asdict(st),
        },
    )
