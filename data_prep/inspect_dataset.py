"""``longnet-prep inspect``: counts, a token-length histogram and a decoded sample of a dataset."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.indexed import open_indexed_dataset
from data_prep.meta import PACKED, read_meta
from data_prep.pack import boundaries_prefix
from data_prep.tokenizers import get_tokenizer


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` for power-of-two buckets [low, high) that hold at least one length."""
    if len(lengths) == 0:
        return []
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    return [(1 << b, 1 << (b + 1), int(c)) for b, c in enumerate(counts) if c]


def dataset_summary(prefix: str) -> dict[str, Any]:
    """Counts and length statistics of the dataset at ``prefix``."""
    meta = read_meta(prefix)
    ds = open_indexed_dataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    return {
        "prefix": prefix,
        "format": meta.get("format", "megatron (no longnet-prep metadata)"),
        "tokenizer": meta.get("tokenizer"),
        "dtype": np.dtype(ds.index.dtype).name,
        "sequences": len(lengths),
        "documents": len(ds.document_indices) - 1,
        "tokens": int(lengths.sum()),
        "bytes": os.path.getsize(prefix + ".bin"),
        "min": int(lengths.min()) if len(lengths) else 0,
        "median": float(np.median(lengths)) if len(lengths) else 0.0,
        "mean": float(lengths.mean()) if len(lengths) else 0.0,
        "max": int(lengths.max()) if len(lengths) else 0,
        "histogram": length_histogram(lengths),
        "seq_length": meta.get("seq_length"),
    }


def format_summary(summary: dict[str, Any], width: int = 40) -> str:
    lines = [f"{k}: {summary[k]}" for k in ("prefix", "format", "tokenizer", "dtype", "seq_length")]
    lines += [f"{k}: {summary[k]:,}" for k in ("sequences", "documents", "tokens", "bytes")]
    lines.append(
        "length min / median / mean / max: "
        f"{summary['min']:,} / {summary['median']:,.0f} / {summary['mean']:,.1f} / {summary['max']:,}"
    )
    lines.append("token-length histogram:")
    peak = max((c for _, _, c in summary["histogram"]), default=1)
    for low, high, count in summary["histogram"]:
        bar = "#" * max(1, round(width * count / peak))
        lines.append(f"  [{low:>9,}, {high:>9,})  {count:>10,}  {bar}")
    return "\n".join(lines)


def decode_sample(prefix: str, index: int, max_tokens: int | None = None) -> str:
    """Sequence ``index`` decoded with the dataset's tokenizer (and its segment starts if packed)."""
    meta = read_meta(prefix)
    if "tokenizer" not in meta:
        raise PrepError(f"{prefix} has no {prefix}.meta.json, so its tokenizer is unknown")
    ds = open_indexed_dataset(prefix)
    if not 0 <= index < len(ds):
        raise PrepError(f"sample {index} out of range: {prefix} has {len(ds)} sequences")
    tokens = ds[index]
    head = f"sample {index}: {len(tokens):,} tokens"
    if meta.get("format") == PACKED:
        bounds = open_indexed_dataset(boundaries_prefix(prefix))  # kept alive: items view its mmap
        starts = bounds[index]
        head += f", segments start at {starts.tolist()}"
    shown = tokens if max_tokens is None else tokens[:max_tokens]
    text = get_tokenizer(meta["tokenizer"]).decode(shown.tolist())
    more = "" if len(shown) == len(tokens) else f"\n... ({len(tokens) - len(shown):,} more tokens)"
    return f"{head}\n{text}{more}"
