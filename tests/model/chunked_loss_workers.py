"""What the chunked-loss tests run inside gloo ranks (module level so that spawn can pickle it).

One group of 2 ranks: first whole-model checks on each rank alone (TP=1: plain vs chunked loss on the
same weights, and the largest logits-like tensor each path allocates), then TP=2: the loss function
(with and without sequence parallelism) against the unsharded float64 computation, and the whole model
plain vs chunked; then PP=2 through Megatron's schedule, plain vs chunked. The assertions live in
tests/model/test_chunked_loss.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.utils._python_dispatch import TorchDispatchMode

from longnet_megatron.model import (
    build_longnet_gpt,
    chunked_linear_cross_entropy,
    fused_cross_entropy,
    get_preset,
)
from longnet_megatron.model.state_dict import tensors_only
from longnet_megatron.testing import ParallelLayout, initialize_megatron_parallel

from .model_workers import _section, grads_of, load_full_state, positions, run_schedule

# Vocabulary 300: padded to 320 (TP=1) or 384 (TP=2), sizes no other tensor of the tiny model has.
VOCAB = 300
SEQ, BATCH = 150, 2
CHUNK = 128  # does not divide the 300 tokens of a batch


class VocabTensorRecorder(TorchDispatchMode):
    """Records the largest tensor any op returns that has a dimension of ``vocab`` (a logits-like one)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def tiny_preset(tie: bool):
    return get_preset("tiny").replace(vocab_size=VOCAB, tie_embeddings=tie)


def token_weights(seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """A loss mask with weights: random per-token gradients, some zero."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, seq, generator=gen)
    return w * (w > 0.2)


def model_pair(preset, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The plain model and a chunked-loss model with the same weights."""
    plain = build_longnet_gpt(preset, **overrides)
    chunked = build_longnet_gpt(preset, loss_chunk_tokens=CHUNK, **overrides)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def make_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (tokens, labels) over the whole vocabulary, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def loss_and_grads(model: torch.nn.Module, seed: int = 0) -> dict:
    """Per-token loss [b, s] of one batch and the parameter gradients of its weighted sum."""
    tokens, labels = make_batch(seed)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions(tokens), None, labels=labels)
    (loss * token_weights(seed + 1)).sum().backward()
    return {"loss": loss.detach(), "grads": grads_of(model)}


def single_rank_model_checks() -> dict:
    """TP=1: plain vs chunked on the same weights (tied and untied), logits unchanged, largest tensors."""
    out = {}
    for tie in (True, False):
        plain, chunked = model_pair(tiny_preset(tie))
        out[f"tie={tie}"] = {"plain": loss_and_grads(plain), "chunked": loss_and_grads(chunked)}
    tokens, _ = make_batch(5)
    with torch.no_grad():
        out["logits"] = [m(tokens, positions(tokens), None) for m in (plain, chunked)]
    vocab = plain.output_layer.weight.shape[0]
    out["largest"] = {}
    for name, model in (("plain", plain), ("chunked", chunked)):
        with VocabTensorRecorder(vocab) as recorder:
            loss_and_grads(model)
        out["largest"][name] = recorder.largest
    out["vocab"], out["tokens"] = vocab, BATCH * SEQ
    return out


def _function_case(seed: int, s: int, b: int, h: int, v: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s), generator=gen)
    grad = torch.rand(b, s, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, labels, grad


def tp_function_checks(dtype: torch.dtype = torch.float64) -> dict:
    """The loss function under TP=2 (vocabulary split; sequence parallel too) vs unsharded float64,
    its inputs rounded to ``dtype``."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank, size = tp_group.rank(), tp_group.size()
    s, b, h, v = 26, 3, 8, 40
    out = {}
    for sequence_parallel in (False, True):
        case = _function_case(7, s, b, h, v)
        hidden, weight, bias, labels, grad = (
            t.to(dtype).to(torch.float64) if t.is_floating_point() else t for t in case
        )
        if sequence_parallel:
            bias = None  # Megatron's output layer has none; the bias path is covered without SP
        ref_in = [
            t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())
        ]
        logits = F.linear(*ref_in)
        ref_loss = F.cross_entropy(logits.reshape(s * b, v), labels.t().reshape(-1), reduction="none")
        ref_loss = ref_loss.view(s, b).t()
        ref_grads = torch.autograd.grad((ref_loss * grad).sum(), ref_in)

        rows, vocab = (
            slice(rank * s // size, (rank + 1) * s // size),
            slice(rank * v // size, (rank + 1) * v // size),
        )
        local = [
            (hidden[rows] if sequence_parallel else hidden).to(dtype, copy=True).requires_grad_(),
            weight[vocab].to(dtype, copy=True).requires_grad_(),
        ]
        if bias is not None:
            local.append(bias[vocab].to(dtype, copy=True).requires_grad_())
        loss = chunked_linear_cross_entropy(
            local[0],
            local[1],
            labels,
            7,
            bias=local[2] if bias is not None else None,
            tp_group=tp_group,
            sequence_parallel=sequence_parallel,
        )
        grads = torch.autograd.grad((loss * grad.to(dtype)).sum(), local)
        expected = [ref_grads[0][rows] if sequence_parallel else ref_grads[0], ref_grads[1][vocab]]
        if bias is not None:
            expected.append(ref_grads[2][vocab])
        out[f"sp={sequence_parallel}"] = {
            "loss": loss.detach().double(),
            "ref_loss": ref_loss.detach(),
            "grads": [g.detach().double() for g in grads],
            "ref_grads": [g.detach() for g in expected],
        }
    return out


@contextlib.contextmanager
def forced_fused_loss() -> Iterator[None]:
    """The chunked loss takes the Triton kernels (:mod:`~longnet_megatron.model.fused_cross_entropy`)
    on CPU tensors too, which run in Triton's interpreter."""
    saved = fused_cross_entropy.fused_applies
    fused_cross_entropy.fused_applies = lambda logits: logits.dtype in fused_cross_entropy._DTYPES
    try:
        yield
    finally:
        fused_cross_entropy.fused_applies = saved


def tp_model_checks() -> dict:
    """Whole model under TP=2: plain vs chunked. (Sequence parallelism needs TE or apex layer norms,
    absent on CPU; the function's sequence-parallel path is checked above.)"""
    plain, chunked = model_pair(tiny_preset(True))
    return {"plain": loss_and_grads(plain), "chunked": loss_and_grads(chunked)}


def pipeline_checks(state: dict) -> dict:
    """PP=2 through Megatron's schedule, tied embeddings: plain vs chunked on the same weights."""
    out = {}
    for name, overrides in (("plain", {}), ("chunked", {"loss_chunk_tokens": CHUNK})):
        model = build_longnet_gpt(
            tiny_preset(True),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            **overrides,
        )
        load_full_state(model, state)
        out[name] = run_schedule([model])
    out["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


def chunked_loss_worker() -> dict:
    """All chunked-loss checks on this rank of a 2-rank group (started with TP = 1, DP = 2)."""
    out = {"single": _section(single_rank_model_checks)}
    torch.manual_seed(100)
    state = tensors_only(build_longnet_gpt(tiny_preset(True)).state_dict())  # same on both ranks
    initialize_megatron_parallel(ParallelLayout(tp=2))
    out["tp_function"] = _section(tp_function_checks)
    with forced_fused_loss():
        out["tp_function_fused"] = _section(tp_function_checks, torch.float32)
    out["tp_model"] = _section(tp_model_checks)
    initialize_megatron_parallel(ParallelLayout(pp=2))
    out["pp_model"] = _section(pipeline_checks, state)
    return out
