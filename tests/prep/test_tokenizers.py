"""Each tokenizer kind round-trips text and rebuilds itself from its description."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import tiktoken_ext

from data_prep.tokenizers import TokenizerError, get_tokenizer

BUNDLED = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture
def tiktoken_cache(tmp_path, monkeypatch) -> Path:
    """A TIKTOKEN_CACHE_DIR holding cl100k_base under the name tiktoken looks for (sha1 of the URL)."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copy(BUNDLED, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def rank_file(tmp_path) -> Path:
    path = tmp_path / "custom.tiktoken"
    shutil.copy(BUNDLED, path)
    return path


def _all_kinds(rank_file) -> dict:
    return {
        "offline": get_tokenizer(),
        "by-name": get_tokenizer("cl100k_base"),
        "rank-file": get_tokenizer(str(rank_file)),
        "bytes": get_tokenizer("bytes"),
    }


def test_every_kind_round_trips_and_never_emits_eod_for_text(tiktoken_cache, rank_file, texts):
    for name, tok in _all_kinds(rank_file).items():
        for text in texts:
            ids = tok.encode(text)
            assert tok.eod_id not in ids, name
            assert tok.decode(ids) == text, name
            assert list(tok.encode_batch([text])[0]) == ids, name
            assert max(ids) < tok.vocab_size, name


def test_ids_and_special_tokens_match_cl100k(tiktoken_cache, rank_file, texts):
    offline, by_name, from_file = get_tokenizer(), get_tokenizer("cl100k_base"), get_tokenizer(str(rank_file))
    assert offline.eod_id == by_name.eod_id == 100257
    assert from_file.eod_id == 100256  # the id after the largest rank of the file
    assert offline.encode(texts[1]) == by_name.encode(texts[1]) == from_file.encode(texts[1])
    byte = get_tokenizer("bytes")
    assert (byte.eod_id, byte.vocab_size) == (256, 257)


def test_description_rebuilds_the_same_tokenizer(tiktoken_cache, rank_file, texts):
    for tok in _all_kinds(rank_file).values():
        again = get_tokenizer(tok.describe())
        assert again.describe() == tok.describe()
        assert again.encode(texts[1]) == tok.encode(texts[1])
        assert (again.eod_id, again.vocab_size) == (tok.eod_id, tok.vocab_size)


def test_changed_rank_file_is_refused_by_its_description(rank_file):
    desc = get_tokenizer(str(rank_file)).describe()
    with open(rank_file, "ab") as f:
        f.write(b"\n")
    with pytest.raises(TokenizerError, match="sha256"):
        get_tokenizer(desc)


def test_unknown_and_uncached_encodings_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("no_such_encoding")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # fail fast instead of downloading
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(TokenizerError, match="not in tiktoken's cache"):
        get_tokenizer("p50k_base")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer(os.path.join(str(tmp_path), "missing.tiktoken"))
