"""The chunked output layer + loss equals the plain path (logits, then cross-entropy) without its logits.

In process: the loss function against ``F.linear`` + ``F.cross_entropy`` (float64 and float32, chunk
sizes that do not divide the tokens, a chunk larger than all of them, with and without bias), the
largest logits-like tensor each path allocates, argument checks. In a 2-rank gloo group
(chunked_loss_workers.py): the whole tiny model plain vs chunked (tied and untied output weights),
tensor parallelism (vocabulary split, sequence parallel) and the model's unchanged logits path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longnet_megatron.model import chunked_linear_cross_entropy, make_longnet_config
from longnet_megatron.model import chunked_loss as chunked_loss_module
from longnet_megatron.testing import ParallelLayout, run_distributed

from . import chunked_loss_workers as workers
from .checks import assert_close, assert_grads_match, section_of

TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
S, B, H, V = 37, 2, 16, 50  # 74 tokens


def make_inputs(dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype)
    b = torch.randn(V, generator=gen, dtype=dtype) if bias else None
    labels = torch.randint(0, V, (B, S), generator=gen)
    grad = torch.rand(B, S, generator=gen, dtype=dtype)  # the loss mask / scale per token
    return hidden, weight, b, labels, grad


def plain(hidden, weight, bias, labels, grad):
    """Loss [b, s] and gradients (hidden, weight[, bias]) from the full logits."""
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logits = F.linear(*params).to(torch.promote_types(hidden.dtype, torch.float32))
    loss = F.cross_entropy(logits.reshape(S * B, V), labels.t().reshape(-1), reduction="none")
    loss = loss.view(S, B).t()
    return loss.detach(), torch.autograd.grad((loss * grad).sum(), params)


def chunked(hidden, weight, bias, labels, grad, chunk_tokens):
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = chunked_linear_cross_entropy(
        params[0], params[1], labels, chunk_tokens, bias=params[2] if bias is not None else None
    )
    return loss.detach(), torch.autograd.grad((loss * grad).sum(), params)


def assert_same(actual, expected, dtype) -> None:
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype], msg=lambda m: f"loss: {m}")
    for name, g, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOLERANCE[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 32, 74, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_grads_equal_the_plain_path(dtype, chunk_tokens, bias):
    inputs = make_inputs(dtype, bias)
    assert_same(chunked(*inputs, chunk_tokens), plain(*inputs), dtype)


def test_a_wrong_chunk_gradient_fails_the_comparison(monkeypatch):
    """The comparison above catches a backward that drops one token of each chunk."""
    inputs = make_inputs(torch.float64, bias=True)
    grad_logits = chunked_loss_module._grad_logits

    def drop_last_token(*args):
        out = grad_logits(*args)
        out[-1] = 0
        return out

    monkeypatch.setattr(chunked_loss_module, "_grad_logits", drop_last_token)
    with pytest.raises(AssertionError, match="grad hidden"):
        assert_same(chunked(*inputs, 32), plain(*inputs), torch.float64)


def test_no_logits_sized_tensor_is_allocated():
    """Forward + backward hold at most chunk x V logits (or the V x H weight); the recorder does see the
    plain path's [s, b, V]."""
    inputs = make_inputs(torch.float32, bias=False)
    with workers.VocabTensorRecorder(V) as recorder:
        chunked(*inputs, 8)
    assert recorder.largest <= max(8 * V, V * H) < S * B * V
    with workers.VocabTensorRecorder(V) as recorder:
        plain(*inputs)
    assert recorder.largest >= S * B * V


def test_bad_arguments_are_refused():
    hidden, weight, _, labels, _ = make_inputs(torch.float32, bias=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_linear_cross_entropy(hidden, weight, labels, bad)
    with pytest.raises(ValueError, match=r"labels \(37, 2\) do not match"):
        chunked_linear_cross_entropy(hidden, weight, labels.t(), 8)


def test_config_knob_is_checked():
    assert make_longnet_config("tiny").loss_chunk_tokens is None  # off unless asked for
    assert make_longnet_config("tiny", loss_chunk_tokens=4096).loss_chunk_tokens == 4096
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=f"loss_chunk_tokens={bad}"):
            make_longnet_config("tiny", loss_chunk_tokens=bad)


# ---------------------------------------------------------------- whole model and tensor parallel


@pytest.fixture(scope="module")
def group_results() -> list[dict]:
    return run_distributed(workers.chunked_loss_worker, 2, layout=ParallelLayout(), timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_and_grads_equal_the_plain_path(group_results, tie):
    result = section_of(group_results, "single", 0)[f"tie={tie}"]
    plain_run, chunked_run = result["plain"], result["chunked"]
    assert chunked_run["loss"].shape == (workers.BATCH, workers.SEQ)
    assert_close(chunked_run["loss"], plain_run["loss"], "per-token loss")
    assert_grads_match(chunked_run["grads"], plain_run["grads"], "chunked vs plain")
    output = "embedding.word_embeddings.weight" if tie else "output_layer.weight"
    assert output in chunked_run["grads"]
    assert plain_run["grads"][output].abs().max() > 1e-2  # large next to the tolerance


@pytest.mark.slow
def test_model_without_labels_returns_the_same_logits(group_results):
    plain_logits, chunked_logits = section_of(group_results, "single", 0)["logits"]
    assert chunked_logits.shape == (workers.BATCH, workers.SEQ, 320)
    assert_close(chunked_logits, plain_logits, "logits")


@pytest.mark.slow
def test_model_never_allocates_the_logits(group_results):
    result = section_of(group_results, "single", 0)
    vocab, tokens = result["vocab"], result["tokens"]
    assert result["largest"]["plain"] >= tokens * vocab  # the recorder sees the plain path's logits
    assert result["largest"]["chunked"] <= workers.CHUNK * vocab


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_loss_equals_the_unsharded_one(group_results, sequence_parallel):
    for rank in range(2):
        result = section_of(group_results, "tp_function", rank)[f"sp={sequence_parallel}"]
        tol = TOLERANCE[torch.float64]
        torch.testing.assert_close(result["loss"], result["ref_loss"], **tol)
        assert len(result["grads"]) == (2 if sequence_parallel else 3)
        for g, ref in zip(result["grads"], result["ref_grads"]):
            torch.testing.assert_close(g, ref, **tol)


@pytest.mark.slow
def test_tensor_parallel_model_equals_its_plain_path(group_results):
    for rank in range(2):
        result = section_of(group_results, "tp_model", rank)
        assert_close(result["chunked"]["loss"], result["plain"]["loss"], f"rank {rank} loss")
        assert_grads_match(result["chunked"]["grads"], result["plain"]["grads"], f"rank {rank}")
        assert result["plain"]["grads"]["embedding.word_embeddings.weight"].shape[0] == 192  # 384 / 2


@pytest.mark.slow
def test_pipeline_parallel_model_equals_its_plain_path(group_results):
    for rank in range(2):
        result = section_of(group_results, "pp_model", rank)
        plain_run, chunked_run = result["plain"], result["chunked"]
        if result["last_stage"]:
            assert_close(chunked_run["loss"], plain_run["loss"], "pipeline loss")
            assert "output_layer.weight" in chunked_run["grads"]  # the last stage's copy of the tied weight
        assert_grads_match(chunked_run["grads"], plain_run["grads"], f"pipeline rank {rank}")
