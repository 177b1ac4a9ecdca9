"""Scoring token sequences: per-token losses without the logits tensor, and logits at a few positions.

Both evaluations need the same two things from a model: the loss of every token (perplexity) and the
full next-token distribution at a handful of positions (passkey: the key's log-probability and greedy
argmax). Materialising ``[tokens, vocabulary]`` logits is what a long context cannot afford (1M tokens
x 100K ids is 200 GB in bf16), so the loss goes through the chunked output layer + cross-entropy
(:func:`~longnet_megatron.model.chunked_linear_cross_entropy`) and only the requested positions get
logits. :class:`PlainScorer` runs an exported model in this process; the Megatron scorer
(:mod:`.megatron_scorer`) runs a checkpoint under any TP / PP / CP layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from longnet_megatron.eval.errors import EvalError
from longnet_megatron.export.plain import LongNetForCausalLM
from longnet_megatron.model import chunked_linear_cross_entropy
from longnet_megatron.train.metrics import memory_gib

DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class Scores:
    """losses ``[b, n]`` float32: ``-log p(labels[:, i] | tokens[:, :i + 1])``; logits ``[b, k, V]``
    float32 at the k requested positions (None when none were asked for). On the CPU."""

    losses: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelShape:
    """What the activation estimate needs: dimensions, padded vocabulary, parameter bytes, split."""

    hidden: int
    ffn: int
    vocab: int
    parameter_bytes: int
    dtype_bytes: int
    tp: int = 1
    cp: int = 1

    def activation_bytes(self, tokens: int, chunk_tokens: int) -> int:
        """Largest live set of one forward of ``tokens`` tokens (this rank's share of them).

        Residual stream, norm output and a block's output (3 h); the attention projections' live
        outputs (2 h / tp); the MLP's intermediate and its activation (2 f / tp); the dilated
        attention's fp32 merge accumulators (4 h / tp bytes); one loss chunk of fp32 logits, twice.
        An estimate, a little above what was measured: 125m at 1M tokens in bf16 on an H200 peaked at
        18.7 GiB with the weights, this gives 25.6 GiB (benchmarks/eval.md).
        """
        local = -(-tokens // self.cp)
        h, f, tp, b = self.hidden, self.ffn, self.tp, self.dtype_bytes
        per_token = b * (3 * h + (2 * h + 2 * f) // tp) + 4 * h // tp
        return local * per_token + 8 * chunk_tokens * self.vocab // tp


@dataclass
class BaseScorer:
    """What both scorers share: the tokenizer, a description for the results, memory checks."""

    tokenizer: Any
    description: dict[str, Any]
    shape: ModelShape
    device: torch.device
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    cp_size: int = 1
    is_main: bool = True
    _peak_reset: bool = field(default=False, repr=False)

    def score(self, tokens: torch.Tensor, labels: torch.Tensor, positions: list[int] | None = None) -> Scores:
        """Losses of ``labels`` given ``tokens`` (both ``[b, n]``), logits at ``positions`` (0 <= p < n)."""
        if tokens.shape != labels.shape or tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must be [b, n]")
        try:
            with torch.no_grad():
                return self._forward(tokens, labels, positions or [])
        except torch.OutOfMemoryError as e:
            raise EvalError(
                f"out of memory scoring {tokens.shape[0]} x {tokens.shape[1]:,} tokens on {self.device} "
                f"({memory_gib():.1f} GiB peak): evaluate shorter lengths, fewer --batch-tokens, or split "
                "the sequence with context parallelism (torchrun, --cp)"
            ) from e

    def _forward(self, tokens: torch.Tensor, labels: torch.Tensor, positions: list[int]) -> Scores:
        raise NotImplementedError

    def check_fits(self, tokens: int, option: str) -> None:
        """Raise :class:`EvalError` naming ``option`` when a forward of ``tokens`` tokens cannot fit."""
        need = self.shape.activation_bytes(tokens, self.chunk_tokens)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        if need > free:
            raise EvalError(
                f"{option}: a forward pass of {tokens:,} tokens needs about {need / 2**30:.1f} GiB of "
                f"activations, {free / 2**30:.1f} GiB are free on {self.device}; evaluate shorter lengths "
                "or split the sequence with context parallelism (torchrun, --cp)"
            )

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self) -> float:
        """Peak CUDA allocation since the last reset (GPU), or the process's peak resident set (CPU)."""
        return memory_gib()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PlainScorer(BaseScorer):
    """An exported model (:class:`~longnet_megatron.export.plain.LongNetForCausalLM`) in this process."""

    def __init__(self, model: LongNetForCausalLM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model

    def _forward(self, tokens: torch.Tensor, labels: torch.Tensor, positions: list[int]) -> Scores:
        hidden = self.model.model(tokens.to(self.device))  # [b, n, h] after the final norm
        weight = self.model.lm_head.weight
        losses = chunked_linear_cross_entropy(
            hidden.transpose(0, 1), weight, labels.to(self.device), self.chunk_tokens
        )
        logits = None
        if positions:
            logits = torch.matmul(hidden[:, positions], weight.t()).float().cpu()
        return Scores(losses.float().cpu(), logits)
