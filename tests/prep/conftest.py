"""Fixtures for the longnet-prep tests: small corpora in every input format, dataset readers."""

from __future__ import annotations

import gzip
import json
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


def write_jsonl(path: Path, rows: list, compress: str | None = None) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
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
