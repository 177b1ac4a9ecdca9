"""Megatron's own GPTDataset reads a packed dataset one packed sequence per sample, any epoch count;
the naive settings (seq_length = L, extra token) would straddle sequences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.errors import PrepError
from data_prep.megatron_config import (
    gpt_dataset_config_for,
    model_inputs,
    packed_sequence_index,
    read_pack_summary,
)
from data_prep.pack import pack_datasets
from data_prep.tokenize_corpus import tokenize_corpus

L = 48


@pytest.fixture
def packed(tmp_path, many_docs_corpus):
    corpus, _ = many_docs_corpus
    tokenize_corpus([str(corpus)], str(tmp_path / "tok"), workers=1, progress=False, log=lambda m: None)
    pack_datasets([str(tmp_path / "tok")], str(tmp_path / "p"), seq_length=L, split="90,10,0", progress=False)
    return str(tmp_path / "p")


def build(config, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


@pytest.mark.parametrize("epochs", [None, 2.5])
def test_gpt_dataset_sample_is_exactly_one_packed_sequence(tmp_path, packed, read_docs, epochs):
    seqs = read_docs(packed + "_train")
    bounds = read_docs(packed + "_train.boundaries")
    size = None if epochs is None else int(epochs * len(seqs))
    config = gpt_dataset_config_for(packed, seq_length=L, path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build(config, [size, None, None])
    assert test is None and len(valid) == len(read_docs(packed + "_valid"))
    n = len(seqs)
    epochs_built = 1 if size is None else -(-size // n)  # Megatron builds whole epochs
    assert len(train) == epochs_built * n
    seen = []
    for i in range(len(train)):
        sample = train[i]
        j = packed_sequence_index(train, i)
        x = model_inputs(sample)
        assert x["tokens"].shape == (L,)
        assert torch.equal(x["tokens"], torch.from_numpy(seqs[j][:L].astype(np.int64)))
        assert torch.equal(x["labels"], torch.from_numpy(seqs[j][1:].astype(np.int64)))
        assert bool(x["loss_mask"].all())
        assert bounds[j][0] == 0
        seen.append(j)
    assert np.bincount(seen, minlength=n).tolist() == [epochs_built] * n  # each sequence once per epoch


def test_megatron_default_settings_would_straddle_packed_sequences(tmp_path, packed, read_docs):
    """Why gpt_dataset_config_for uses seq_length L+1 without the extra token: with Megatron's
    default (seq_length L plus one extra token) samples advance L tokens and drift off the sequences."""
    import dataclasses

    seqs = {s.tobytes() for s in read_docs(packed + "_train")}
    good = gpt_dataset_config_for(packed, seq_length=L, path_to_cache=str(tmp_path / "c1"))
    naive = dataclasses.replace(good, sequence_length=L, add_extra_token_to_sequence=True)
    naive.path_to_cache = str(tmp_path / "c2")
    train = build(naive, [None, None, None])[0]
    matches = [
        train[i]["tokens"].numpy().astype(np.int32).tobytes() in {s[:L] for s in seqs} for i in range(20)
    ]
    assert not all(matches)


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(PrepError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_pack_summary_problems_are_one_line_prep_errors(tmp_path, packed):
    summary = json.loads(Path(packed + ".pack.json").read_text())

    def write(name, text):
        (tmp_path / f"{name}.pack.json").write_text(text)
        return str(tmp_path / name)

    assert "not found" in _one_line_error(read_pack_summary, str(tmp_path / "none"))
    truncated = write("trunc", json.dumps(summary)[:40])
    assert "cannot read" in _one_line_error(read_pack_summary, truncated)
    for text in ("[1, 2]", json.dumps({"format": "something else"})):
        wrong = write("wrong", text)
        assert "is not a summary written by `longnet-prep pack`" in _one_line_error(read_pack_summary, wrong)
    lacking = write("lacking", json.dumps(dict(summary, seq_length="48")))
    assert "lacks seq_length" in _one_line_error(read_pack_summary, lacking)
    summary["splits"]["train"]["sequences"] = 0
    empty = write("empty", json.dumps(summary))
    message = _one_line_error(gpt_dataset_config_for, empty, seq_length=L)
    assert message.startswith(f"{empty}: the train split holds no sequence")


def test_a_split_training_needs_must_hold_sequences(tmp_path, many_docs_corpus):
    corpus, _ = many_docs_corpus
    tokenize_corpus([str(corpus)], str(tmp_path / "tok"), workers=1, progress=False, log=lambda m: None)
    only_train = str(tmp_path / "t")
    pack_datasets([str(tmp_path / "tok")], only_train, seq_length=L, split="1", progress=False)
    assert gpt_dataset_config_for(only_train, seq_length=L).blend_per_split[1:] == [None, None]
    message = _one_line_error(
        gpt_dataset_config_for, only_train, seq_length=L, required_splits=("train", "valid")
    )
    assert message.startswith(f"{only_train}: the valid split holds no sequence")
    no_train = str(tmp_path / "v")
    pack_datasets([str(tmp_path / "tok")], no_train, seq_length=L, split="0,1,0", progress=False)
    assert "the train split holds no sequence" in _one_line_error(read_pack_summary, no_train)
