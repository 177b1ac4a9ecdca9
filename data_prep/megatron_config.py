"""How Megatron's own GPTDataset must read a packed dataset: one packed sequence per sample.

Why not ``sequence_length = L`` with ``add_extra_token_to_sequence = True`` (Megatron's default)?
GPTDataset then advances L tokens per sample through the (shuffled) concatenation of stored
sequences, so consecutive samples share a token and sample i starts i tokens off packed sequence i:
samples straddle packed sequences. With ``sequence_length = L + 1`` and
``add_extra_token_to_sequence = False`` it advances exactly L+1 tokens per sample, every sample is
exactly one stored sequence (whatever the document shuffle, the sample shuffle or the number of
epochs), and ``tokens`` / ``labels`` are the L+1 tokens and their shift with one padded label at the
end. :func:`model_inputs` cuts that last position off, which leaves the model L input tokens and L
real labels: the L+1 packed tokens, used in full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from data_prep.errors import PrepError
from data_prep.meta import PACKED
from data_prep.pack import SPLITS, split_prefix, summary_path
from data_prep.tokenizers import get_tokenizer


class MegatronTokenizerView:
    """The part of a tokenizer GPTDataset reads: ``vocab_size``, ``eod`` and ``unique_identifiers``
    (which goes into the hash that names GPTDataset's index cache). No ``pad``: Megatron then pads
    with -1, which never collides with a real token."""

    def __init__(self, description: dict[str, Any], vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "longnet-prep", "tokenizer": description}


def read_pack_summary(prefix: str, required_splits: Sequence[str] = ("train",)) -> dict[str, Any]:
    """The ``<prefix>.pack.json`` written by ``longnet-prep pack``, checked.

    The one reader of that file. Raises :class:`PrepError` (one line naming the file) when it is
    missing, unreadable or truncated, not a pack summary, or when a split of ``required_splits`` holds
    no sequence (training needs its train split, evaluation the split it reads).
    """
    path = summary_path(prefix)
    if not os.path.exists(path):
        raise PrepError(f"{path} not found: {prefix} is not the output prefix of `longnet-prep pack`")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"cannot read {path} ({e}); pack {prefix} again") from e
    if not isinstance(summary, dict) or summary.get("format") != PACKED:
        raise PrepError(f"{path} is not a summary written by `longnet-prep pack` (format {PACKED!r})")
    splits = summary.get("splits")
    valid = (
        isinstance(summary.get("seq_length"), int)
        and isinstance(summary.get("tokenizer"), dict)
        and isinstance(splits, dict)
        and all(isinstance(v, dict) and isinstance(v.get("sequences"), int) for v in splits.values())
    )
    if not valid:
        raise PrepError(f"{path} lacks seq_length, tokenizer or per-split counts; pack {prefix} again")
    for split in required_splits:
        if _sequences(summary, split) == 0:
            raise PrepError(
                f"{prefix}: the {split} split holds no sequence ({path}: split {summary.get('split')}, "
                f"L = {summary['seq_length']:,}); pack it again with more data, a {split} weight or a smaller L"
            )
    return summary


def _sequences(summary: dict[str, Any], split: str) -> int:
    return int(summary["splits"].get(split, {}).get("sequences", 0))


def gpt_dataset_config_for(
    prefix: str,
    seq_length: int | None = None,
    *,
    random_seed: int = 1234,
    path_to_cache: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    required_splits: Sequence[str] = ("train",),
    summary: dict[str, Any] | None = None,
):
    """A ``GPTDatasetConfig`` that reads the packed dataset ``prefix`` one packed sequence per sample.

    ``summary``: the prefix's :func:`read_pack_summary`, when the caller has read it already.

    ``seq_length`` (the model's L) is checked against the packed length when given. A split in
    ``required_splits`` that holds no sequence is a :class:`PrepError` naming the prefix and split;
    other empty or unwritten splits get no blend (Megatron builds no dataset for them). The index
    cache goes to ``path_to_cache`` (default ``<prefix>_gpt_cache``). The attention mask is not
    built: at L = 1M a dense mask would not fit; the attention kernel masks causally itself.
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    summary = read_pack_summary(prefix) if summary is None else summary
    length = int(summary["seq_length"])
    if seq_length is not None and seq_length != length:
        raise PrepError(f"{prefix} is packed for seq_length {length}, not {seq_length}; pack it again")
    for split in required_splits:
        if split not in SPLITS:
            raise PrepError(f"unknown split {split!r}: the splits are {', '.join(SPLITS)}")
        if _sequences(summary, split) == 0:
            raise PrepError(
                f"{prefix}: the {split} split holds no sequence ({summary_path(prefix)}); "
                f"pack it again with a {split} weight and enough data for L = {length:,}"
            )
    tok = get_tokenizer(summary["tokenizer"])
    blend_per_split = [
        ([split_prefix(prefix, s)], None) if _sequences(summary, s) > 0 else None for s in SPLITS
    ]
    return GPTDatasetConfig(
        random_seed=random_seed,
        sequence_length=length + 1,
        add_extra_token_to_sequence=False,
        blend_per_split=blend_per_split,
        tokenizer=MegatronTokenizerView(tok.describe(), tok.vocab_size, tok.eod_id),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        path_to_cache=path_to_cache or f"{prefix}_gpt_cache",
        mmap_bin_files=True,
    )


def model_inputs(sample: dict[str, Any]) -> dict[str, Any]:
    """A GPTDataset sample (L+1 positions) cut to the model's L: drops the one padded label."""
    return {
        k: v[..., :-1] for k, v in sample.items() if k in ("tokens", "labels", "loss_mask", "position_ids")
    }


def packed_sequence_index(dataset: Any, i: int) -> int:
    """Which packed sequence GPTDataset sample ``i`` is (to look up its document boundaries).

    Each sample ends exactly at the end of one stored sequence (see the module docstring); the
    sample index's end entry names that sequence through the document index.
    """
    if dataset.shuffle_index is None:  # defer_npy_index_mmap: let GPTDataset load its indices
        dataset[i]
    end = dataset.sample_index[int(dataset.shuffle_index[i]) + 1]
    return int(dataset.document_index[int(end[0])])
