"""The JSON sidecar ``<prefix>.meta.json`` that travels with every dataset longnet-prep writes.

It records the tokenizer (as :meth:`Tokenizer.describe` returns it) so that inspect, pack, merge and
the trainer rebuild the same tokenizer, plus counts and, for packed datasets, the sequence length.
"""

from __future__ import annotations

import json
import os
from typing import Any

from data_prep.errors import PrepError

TOKENIZED = "longnet-prep/tokenized"
PACKED = "longnet-prep/packed"
BOUNDARIES = "longnet-prep/boundaries"


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def dataset_paths(prefix: str) -> list[str]:
    """The files of one dataset, in commit order: the ``.idx`` (Megatron's marker of a finished
    dataset) after the data and the metadata."""
    return [prefix + ".bin", meta_path(prefix), prefix + ".idx"]


def write_meta(path: str, meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def read_meta(prefix: str) -> dict[str, Any]:
    """Metadata of a dataset; a Megatron dataset made elsewhere (no sidecar) gets an empty dict."""
    if not os.path.exists(prefix + ".idx") or not os.path.exists(prefix + ".bin"):
        raise PrepError(f"no dataset at {prefix} (expected {prefix}.bin and {prefix}.idx)")
    path = meta_path(prefix)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PrepError(f"cannot read {path}: {e}") from e
