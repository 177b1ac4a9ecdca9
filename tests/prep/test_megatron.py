"""Megatron's own GPTDataset reads a packed dataset one packed sequence per sample, any epoch count;
the naive settings (seq_length = L, extra token) would straddle sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.megatron_config import gpt_dataset_config_for, model_inputs, packed_sequence_index
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
