"""The tokenizer of an exported folder: its description in ``tokenizer_config.json``, rank file beside it.

The project's tokenizers (``data_prep.tokenizers``) are tiktoken encodings, custom ``.tiktoken`` rank
files, or bytes; each is described by a plain dict. An export stores that dict under
``"longnet_tokenizer"``; a custom rank file is copied into the folder as ``tokenizer.tiktoken`` and
the description then names it relative to the folder, so the export can be moved or published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data_prep.tokenizers import EOD_TEXT, TokenizerError, get_tokenizer
from longnet_megatron.checkpoint.errors import CheckpointError

TOKENIZER_CONFIG = "tokenizer_config.json"
RANK_FILE = "tokenizer.tiktoken"


def write_tokenizer(folder: Path, description: dict[str, Any], max_length: int) -> Any:
    """Write ``tokenizer_config.json`` (and the rank file) for ``description``; return the tokenizer."""
    try:
        tokenizer = get_tokenizer(description)
    except TokenizerError as e:
        raise CheckpointError(f"the checkpoint's tokenizer cannot be built: {e}", "missing") from e
    stored = dict(description)
    if stored.get("kind") == "tiktoken_file":
        shutil.copyfile(stored["path"], folder / RANK_FILE)
        stored["path"] = RANK_FILE
    config = {
        "longnet_tokenizer": stored,
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_token": EOD_TEXT,
        "eos_token_id": tokenizer.eod_id,
        "model_max_length": max_length,
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def tokenizer_description(folder: str | Path) -> dict[str, Any]:
    """The tokenizer description of an exported folder, rank-file path made absolute."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the export has no tokenizer (pass --tokenizer)", "missing")
    description = dict(json.loads(path.read_text())["longnet_tokenizer"])
    if description.get("kind") == "tiktoken_file" and not Path(description["path"]).is_absolute():
        description["path"] = str((Path(folder) / description["path"]).resolve())
    return description


def load_tokenizer(folder: str | Path, spec: str | dict[str, Any] | None = None) -> Any:
    """The tokenizer an exported model was trained with (or ``spec``, a ``get_tokenizer`` spec)."""
    return get_tokenizer(spec if spec is not None else tokenizer_description(folder))
