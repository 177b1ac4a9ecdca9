"""Fixtures for the longnet-prep tests: small corpora in every input format, dataset readers."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

# Documents chosen to break naive handling: non-ASCII, emoji, CRLF, a literal end-of-text marker
# (must stay text), leading/trailing whitespace, one long document.
TEXTS = [
    "Hello, world!",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🚀🧬.",
    "line one\r\nline two\n\n\tindented\n",
    "a literal <|endoftext|> inside a document stays text",
    "   leading and trailing spaces   ",
    "def f(x):\n    return x ** 2  # code\n" * 40,
    "ACGTTGCAACGT" * 30,
]


COMPRESSIONS = ("gz", "bz2", "xz", "zst")


def compress(data: bytes, kind: str | None) -> bytes:
    """``data`` compressed as a ``.gz``/``.bz2``/``.xz``/``.zst`` file holds it (None: as is)."""
    if kind == "zst":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, None: bytes}[kind](data)


def write_jsonl(path: Path, rows: list, compress_as: str | None = None) -> Path:
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"), compress_as))
    return path


def read_docs(prefix: str) -> list[np.ndarray]:
    """Every sequence of a Megatron indexed dataset, copied out of the mmap."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]


@pytest.fixture
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(name="read_docs")
def read_docs_fixture():
    return read_docs


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    return write_jsonl


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])


@pytest.fixture
def many_docs_corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """300 documents of varied length (2 to ~600 tokens) in JSON lines."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "γάμμα", "delta", "ε", "0x1F", "\n", "def", "日本", "🚀"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 300)))) for _ in range(300)]
    return write_jsonl(tmp_path / "many.jsonl", [{"text": t} for t in texts]), texts
