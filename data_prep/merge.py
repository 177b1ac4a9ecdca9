"""``longnet-prep merge``: several datasets (shards) into one, with megatron's ``add_index``.

Shards must share tokenizer and dtype (and, if packed, sequence length); document order is the
order of the shards. Packed shards have their boundary sidecars merged in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_prep.atomic import atomic_outputs
from data_prep.errors import PrepError
from data_prep.indexed import check_indexed_dataset
from data_prep.meta import BOUNDARIES, PACKED, dataset_paths, meta_path, read_meta, write_meta
from data_prep.pack import boundaries_prefix

_MUST_AGREE = ("format", "tokenizer", "dtype", "seq_length")


def merge_datasets(inputs: Sequence[str], output_prefix: str, *, overwrite: bool = False) -> dict:
    """Concatenate the datasets at ``inputs`` into ``output_prefix``; returns the new metadata."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if len(inputs) < 2:
        raise PrepError("merge needs at least two input datasets")
    metas = [read_meta(p) for p in inputs]
    for p, m in zip(inputs, metas):
        if not m:
            raise PrepError(f"{p} has no {meta_path(p)}; merge only datasets made by longnet-prep")
        for key in _MUST_AGREE:
            if m.get(key) != metas[0].get(key):
                raise PrepError(f"{p} differs from {inputs[0]} in {key}: {m.get(key)} != {metas[0].get(key)}")
    packed = metas[0]["format"] == PACKED
    for p in inputs:  # Megatron's add_index copies a .bin without looking at its size
        check_indexed_dataset(p)
        if packed:
            check_indexed_dataset(boundaries_prefix(p))
    prefixes = [output_prefix] + ([boundaries_prefix(output_prefix)] if packed else [])
    paths = [p for prefix in reversed(prefixes) for p in dataset_paths(prefix)]
    dtypes = {output_prefix: np.dtype(metas[0]["dtype"]).type, boundaries_prefix(output_prefix): np.int32}
    with atomic_outputs(paths, overwrite) as tmp:
        for prefix in prefixes:
            builder = IndexedDatasetBuilder(tmp[prefix + ".bin"], dtype=dtypes[prefix])
            for p in inputs:
                builder.add_index(p if prefix == output_prefix else boundaries_prefix(p))
            builder.finalize(tmp[prefix + ".idx"])
        meta = dict(metas[0], merged_from=list(inputs))
        meta["stats"] = {
            k: sum(m["stats"][k] for m in metas)
            for k, v in metas[0].get("stats", {}).items()
            if isinstance(v, int | float) and all(k in m.get("stats", {}) for m in metas)
        }
        write_meta(tmp[meta_path(output_prefix)], meta)
        if packed:
            write_meta(tmp[meta_path(boundaries_prefix(output_prefix))], {"format": BOUNDARIES})
    return meta
