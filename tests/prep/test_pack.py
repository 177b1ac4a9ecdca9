"""pack: every sequence holds L+1 tokens, boundaries mark every document start, nothing is lost or
duplicated beyond the tail / long-document policies, splits are disjoint, the seed decides order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.errors import PrepError
from data_prep.pack import LONG_DOC_POLICIES, TAIL_POLICIES, pack_datasets, sequences_from, split_documents
from data_prep.tokenize_corpus import tokenize_corpus

EOD = 100257


@pytest.fixture
def tokenized(tmp_path, many_docs_corpus, read_docs):
    corpus, _ = many_docs_corpus
    prefix = str(tmp_path / "tok")
    tokenize_corpus([str(corpus)], prefix, workers=1, progress=False, log=lambda m: None)
    return prefix, read_docs(prefix)


def pack(prefix, out, **kw):
    kw.setdefault("progress", False)
    return pack_datasets([prefix], str(out), **kw)


def split_streams(docs, seed, weights):
    """What each split must contain: its documents, in the seeded order, concatenated."""
    order = np.random.default_rng(seed).permutation(len(docs))
    parts = split_documents(order, weights)
    return [[docs[i] for i in part] for part in parts]


def expected_starts(split_docs, full, n_seq):
    """Segment starts per sequence, computed independently from document offsets in the stream."""
    offsets = np.cumsum([0] + [len(d) for d in split_docs])[:-1]
    starts = [{0} for _ in range(n_seq)]
    for off in offsets:
        if off // full < n_seq:
            starts[off // full].add(int(off % full))
    return [sorted(s) for s in starts]


@pytest.mark.parametrize("seq_length", [1, 7, 64, 1000])
def test_sequences_are_exact_slices_of_the_shuffled_stream(tmp_path, tokenized, read_docs, seq_length):
    prefix, docs = tokenized
    full = seq_length + 1
    stats = pack(prefix, tmp_path / "p", seq_length=seq_length, seed=7, split="1")["train"]
    seqs = read_docs(tmp_path / "p_train")
    assert seqs and all(len(s) == full for s in seqs)
    (split_docs,) = [s for s in split_streams(docs, 7, [1, 0, 0]) if s]
    stream = np.concatenate(split_docs)
    packed = np.concatenate(seqs)
    assert np.array_equal(packed, stream[: len(packed)])  # no token lost, duplicated or reordered
    assert len(stream) - len(packed) == stats.tail_tokens_dropped < full  # only the tail is dropped
    assert stats.tokens_in == len(stream) and stats.tokens_out == len(packed)
    bounds = read_docs(f"{tmp_path}/p_train.boundaries")
    assert [b.tolist() for b in bounds] == expected_starts(split_docs, full, len(seqs))


def test_splits_are_disjoint_and_cover_every_document(tmp_path, tokenized, read_docs):
    prefix, docs = tokenized
    stats = pack(prefix, tmp_path / "p", seq_length=32, seed=3, split="80,15,5", tail="pad")
    parts = split_streams(docs, 3, [80, 15, 5])
    assert [len(p) for p in parts] == [240, 45, 15]
    for name, split_docs in zip(("train", "valid", "test"), parts):
        seqs = read_docs(tmp_path / f"p_{name}")
        stream = np.concatenate(split_docs)
        packed = np.concatenate(seqs)
        pad = stats[name].pad_tokens
        assert np.array_equal(packed[: len(packed) - pad], stream)  # pad: every token kept
        assert np.all(packed[len(packed) - pad :] == EOD) and len(packed) % 33 == 0
        assert stats[name].documents == len(split_docs)
        last = read_docs(f"{tmp_path}/p_{name}.boundaries")[-1]
        assert pad == 0 or last[-1] == 33 - pad  # the padding is its own segment


def test_long_document_policies(tmp_path, tokenized, read_docs):
    prefix, docs = tokenized
    full = 17
    (split_docs,) = [s for s in split_streams(docs, 1, [1, 0, 0]) if s]
    long_count = sum(len(d) > full for d in split_docs)
    assert long_count > 10
    st = pack(prefix, tmp_path / "t", seq_length=16, seed=1, split="1", long_docs="truncate")["train"]
    kept = [np.concatenate([d[: full - 1], [EOD]]) if len(d) > full else d for d in split_docs]
    packed = np.concatenate(read_docs(tmp_path / "t_train"))
    assert np.array_equal(packed, np.concatenate(kept)[: len(packed)])
    assert st.long_documents == long_count
    assert st.truncated_tokens == sum(len(d) - full for d in split_docs if len(d) > full)
    st = pack(prefix, tmp_path / "d", seq_length=16, seed=1, split="1", long_docs="drop")["train"]
    kept = [d for d in split_docs if len(d) <= full]
    packed = np.concatenate(read_docs(tmp_path / "d_train"))
    assert np.array_equal(packed, np.concatenate(kept)[: len(packed)])
    assert st.dropped_long_tokens == sum(len(d) for d in split_docs if len(d) > full)


def test_seed_decides_the_order_and_nothing_else(tmp_path, tokenized):
    prefix, _ = tokenized
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        pack(prefix, tmp_path / name, seq_length=50, seed=seed)
    a, b, c = ((tmp_path / f"{n}_train.bin").read_bytes() for n in "abc")
    assert a == b and a != c and len(a) > 0


def test_summary_and_bad_options(tmp_path, tokenized):
    prefix, _ = tokenized
    pack(prefix, tmp_path / "p", seq_length=64, split="9,1,0")
    summary = json.loads((tmp_path / "p.pack.json").read_text())
    assert summary["seq_length"] == 64 and set(summary["splits"]) == {"train", "valid"}
    assert not (tmp_path / "p_test.bin").exists()
    with pytest.raises(PrepError, match="already exists"):
        pack(prefix, tmp_path / "p", seq_length=64, split="9,1,0")
    with pytest.raises(PrepError, match="--split"):
        pack(prefix, tmp_path / "q", split="a,b")
    with pytest.raises(PrepError, match="--seq-length"):
        pack(prefix, tmp_path / "q", seq_length=0)
    with pytest.raises(PrepError, match="no dataset at"):
        pack(str(tmp_path / "missing"), tmp_path / "q")
    assert not list(tmp_path.glob("q*"))


@pytest.mark.parametrize("split", ["nan,1,1", "inf,1,1", "1e400,1,1", "-1,1,1", "0,0,0", "1,1,1,1", "1,,1"])
def test_a_bad_split_is_refused_before_any_work(tmp_path, split):
    """Validated before the inputs are even opened (the input here does not exist)."""
    with pytest.raises(PrepError, match="--split"):
        pack(str(tmp_path / "missing"), tmp_path / "p", split=split)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("long_docs", LONG_DOC_POLICIES)
def test_the_sequence_count_is_known_before_packing(tmp_path, tokenized, read_docs, tail, long_docs):
    prefix, docs = tokenized
    st = pack(prefix, tmp_path / "p", seq_length=16, split="1", tail=tail, long_docs=long_docs)["train"]
    predicted = sequences_from(np.array([len(d) for d in docs]), 17, tail, long_docs)
    assert predicted == st.sequences == len(read_docs(tmp_path / "p_train")) > 0


def test_an_empty_train_split_fails_before_writing(tmp_path, tokenized):
    prefix, docs = tokenized
    tokens = sum(len(d) for d in docs)
    with pytest.raises(
        PrepError, match=f"train split would hold no sequence of L\\+1 = {tokens + 1:,} tokens"
    ):
        pack(prefix, tmp_path / "p", seq_length=tokens, split="1")
    assert not list(tmp_path.glob("p*"))
    assert pack(prefix, tmp_path / "q", seq_length=tokens, split="1", tail="pad")["train"].sequences == 1
