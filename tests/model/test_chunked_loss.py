"""The chunked output layer + loss equals the plain path (logits, then cross-entropy) without its logits.

In process: the loss function against ``F.linear`` + ``F.cross_entropy`` (float64 and float32, chunk
sizes that do not divide the tokens, a chunk larger than all of them, with and without bias), the
largest logits-like tensor each path allocates, argument checks. In a 2-rank gloo group
(chunked_loss_workers.py): the whole tiny model plain vs chunked (tied and untied output weights),
tensor parallelism (vocabulary split, sequence parallel) and the model's unchanged logits path.
The Triton kernels of the CUDA path (fused_cross_entropy.py) run here in Triton's interpreter: each
against the PyTorch path on one chunk, and the whole function forced through them; on the GPU
(marked) in bf16 at a real vocabulary's size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longnet_megatron.model import chunked_linear_cross_entropy, make_longnet_config
from longnet_megatron.model import chunked_loss as chunked_loss_module
from longnet_megatron.model import fused_cross_entropy as fused
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


# ---------------------------------------------------------------- the fused kernels


def chunk_case(dtype: torch.dtype, rows: int, vocab: int, seed: int, vocab_start: int = 0):
    """Logits of one chunk and targets over a vocabulary of which this shard holds ``vocab`` entries."""
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, 2 * vocab, (rows,), generator=gen)  # half of them in another shard
    target[:3] = torch.tensor([vocab_start, vocab_start + vocab - 1, vocab_start + vocab])  # edges
    return logits, target


@pytest.fixture(params=[torch.float32, torch.float16], ids=["fp32", "fp16"])
def kernel_dtype(request):
    if fused.triton is None:
        pytest.fail("triton is a test dependency (requirements-dev.txt)")
    return request.param


@pytest.mark.parametrize("block", [16, 4096])  # 16: the online softmax steps over 5 blocks
def test_fused_stats_equal_the_pytorch_path(kernel_dtype, block, monkeypatch):
    monkeypatch.setattr(fused, "_STATS_BLOCK", block)
    vocab, start = 75, 40
    logits, target = chunk_case(kernel_dtype, 9, vocab, seed=3, vocab_start=start)
    local_max, sum_exp, picked = fused.chunk_softmax_stats(logits, target, start)
    ref = logits.float()
    torch.testing.assert_close(local_max, ref.max(dim=1)[0], rtol=0, atol=0)
    torch.testing.assert_close(
        sum_exp, (ref - ref.max(dim=1, keepdim=True)[0]).exp().sum(1), rtol=2e-6, atol=0
    )
    inside = (target >= start) & (target < start + vocab)
    expected = torch.where(inside, ref.gather(1, (target - start).clamp(0, vocab - 1)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(picked, expected, rtol=0, atol=0)
    assert inside.any() and not inside.all()


def test_fused_logits_grad_equals_the_pytorch_path(kernel_dtype, monkeypatch):
    monkeypatch.setattr(fused, "_GRAD_BLOCK", 32)  # several column blocks, the last one partial
    vocab, start = 75, 40
    logits, target = chunk_case(kernel_dtype, 9, vocab, seed=4, vocab_start=start)
    lse = torch.logsumexp(logits.float(), dim=1) + 0.3  # as if other shards held the rest
    grad_loss = torch.rand(9, generator=torch.Generator().manual_seed(5))
    expected = chunked_loss_module._grad_logits(logits.clone(), lse, target, grad_loss, start, start + vocab)
    out = fused.chunk_logits_grad_(logits, lse, target, grad_loss, start)
    assert out.data_ptr() == logits.data_ptr() and out.dtype == kernel_dtype  # in place, own dtype
    tol = {"rtol": 2e-6, "atol": 1e-7} if kernel_dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-6}
    torch.testing.assert_close(out.float(), expected.to(kernel_dtype).float(), **tol)
    assert (expected < 0).sum() == ((target >= start) & (target < start + vocab)).sum()  # the targets


def test_a_kernel_without_the_target_term_fails(monkeypatch):
    """The grad comparison above catches a kernel that forgets the one-hot (every entry positive)."""
    vocab = 50
    logits, target = chunk_case(torch.float32, 4, vocab, seed=6)
    lse = torch.logsumexp(logits, dim=1)
    expected = chunked_loss_module._grad_logits(logits.clone(), lse, target, torch.ones(4), 0, vocab)
    wrong = fused.chunk_logits_grad_(logits, lse, target + 10 * vocab, torch.ones(4), 0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_function_through_the_kernels_equals_the_plain_path(bias, monkeypatch):
    """float32 forced through the kernels (interpreter); with bias the backward takes the PyTorch path."""
    fused_calls = []
    real = fused.chunk_softmax_stats

    def counting(*args):
        fused_calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fused, "fused_applies", lambda logits: logits.dtype in fused._DTYPES)
    monkeypatch.setattr(fused, "chunk_softmax_stats", counting)
    inputs = make_inputs(torch.float32, bias)
    assert_same(chunked(*inputs, 32), plain(*inputs), torch.float32)
    assert fused_calls == [(32, V), (32, V), (10, V)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_loss_on_the_gpu_equals_the_pytorch_path(dtype, monkeypatch):
    """bf16/fp16 at a real vocabulary's size: loss and gradients of the kernels (and the float32 GEMM
    accumulation of the weight gradient) against the PyTorch path on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    s, b, h, v, chunk = 1000, 2, 256, 50_304, 384
    hidden = torch.randn(s, b, h, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (b, s), device="cuda", generator=gen)
    grad = torch.rand(b, s, device="cuda", generator=gen)

    def run():
        params = [t.clone().requires_grad_() for t in (hidden, weight)]
        loss = chunked_linear_cross_entropy(params[0], params[1], labels, chunk)
        return loss.detach(), torch.autograd.grad((loss * grad).sum(), params)

    assert fused.fused_applies(torch.empty(2, 2, device="cuda", dtype=dtype))
    loss, grads = run()
    monkeypatch.setattr(fused, "FUSED", False)
    ref_loss, ref_grads = run()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip(("hidden", "weight"), grads, ref_grads):
        scale = ref.float().abs().max().item()
        err = (g.float() - ref.float()).abs().max().item()
        assert err <= 1e-2 * scale, f"grad {name}: max error {err:.3g} against max {scale:.3g}"


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
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_fused_loss_equals_the_unsharded_one(group_results, sequence_parallel):
    """float32 through the Triton kernels (interpreter): the ranks' statistics combined as Megatron's."""
    for rank in range(2):
        result = section_of(group_results, "tp_function_fused", rank)[f"sp={sequence_parallel}"]
        tol = TOLERANCE[torch.float32]
        torch.testing.assert_close(result["loss"], result["ref_loss"], **tol)
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


# ---------------------------------------------------------------- tools/bench_loss.py


def test_bench_loss_renders_its_rows_and_refuses_cpu():
    from tests.tool_scripts import load_tool

    bench = load_tool("bench_loss")
    row = {"n": 131072, "hidden": 2048, "vocab": 100352, "chunk": 4096, "fused_ms": 300.0,
           "torch_ms": 510.0, "gemm_floor_ms": 290.0, "plain_ms": None, "fused_peak_gib": 2.5,
           "torch_peak_gib": 5.0, "loss_max_diff": 1e-6, "grad_hidden_rel_diff": 2e-3,
           "grad_weight_rel_diff": 3e-3}  # fmt: skip
    text = bench.render({"device": "H200", "torch": "2.11", "command": "bench_loss.py --n 131072"}, [row])
    assert "| 131072 | 2048 | 100352 | 4096 | 300.0 | 510.0 | 1.70x | 290.0 | - |" in text
    assert "bench_loss.py --n 131072" in text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--n", "64"])
