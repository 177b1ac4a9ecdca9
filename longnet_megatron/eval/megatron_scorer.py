"""Scoring with a Megatron checkpoint under the current parallel layout (TP, PP, CP; one replica).

The model is rebuilt from the checkpoint's record for Megatron's current parallel state
(:func:`~longnet_megatron.checkpoint.weights.build_models`) and runs through Megatron's own forward-
only schedule, so pipeline stages pass activations as in training. Every rank is given the same
``[b, n]`` batch and keeps its contiguous context-parallel chunk (LongNet's split). The last stage's
per-token losses come from the chunked loss (``config.loss_chunk_tokens``); logits at the requested
positions are computed from the decoder's final hidden states (captured by a forward hook) on the
context-parallel rank holding each position, then summed over CP and gathered over TP's vocabulary
shards. Results are all-gathered over CP and broadcast from the last pipeline stage, so every rank
returns the same :class:`~longnet_megatron.eval.scoring.Scores`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from longnet_megatron.checkpoint.weights import build_models, load_weights, padded_vocab_size
from longnet_megatron.eval.scoring import BaseScorer, Scores
from longnet_megatron.parallel.batch import split_batch_for_context_parallel


class MegatronScorer(BaseScorer):
    """A LongNet checkpoint's weights in this rank's model chunk (no virtual pipeline stages)."""

    def __init__(
        self, ckpt: Path, record: dict[str, Any], *, backend: str | None, dtype: torch.dtype, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        (model,) = build_models(record, padded_vocab_size(ckpt), backend)
        load_weights([model], ckpt)
        config = model.config
        config.loss_chunk_tokens = self.chunk_tokens
        model.to(self.device)
        self.inner = model
        if dtype != torch.float32:
            config.bf16, config.fp16 = dtype == torch.bfloat16, dtype == torch.float16
            config.params_dtype = config.pipeline_dtype = dtype
            model = Float16Module(config, model)
        self.model = model.eval()
        self._hidden: torch.Tensor | None = None
        if self.inner.post_process:
            self.inner.decoder.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output) -> None:
        self._hidden = output if isinstance(output, torch.Tensor) else output[0]

    def _output_weight(self) -> torch.Tensor:
        inner = self.inner
        if inner.share_embeddings_and_output_weights:
            return inner.shared_embedding_or_output_weight()
        return inner.output_layer.weight

    def _logits_at(self, positions: list[int], local_start: int) -> torch.Tensor:
        """``[b, k, V]`` logits at global ``positions`` from this rank's hidden states ``[s, b, h]``."""
        hidden, weight = self._hidden, self._output_weight()
        s, b, _ = hidden.shape
        logits = torch.zeros(b, len(positions), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for j, p in enumerate(positions):
            if local_start <= p < local_start + s:
                logits[:, j] = torch.matmul(hidden[p - local_start], weight.t()).float()
        if ps.get_context_parallel_world_size() > 1:
            dist.all_reduce(logits, group=ps.get_context_parallel_group())
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            shards = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(shards, logits, group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(shards, dim=-1)
        return logits

    def _collect(self, positions: list[int], local_start: int, output: torch.Tensor):
        report = {"losses": output.detach().float()}
        if positions:
            report["logits"] = self._logits_at(positions, local_start)
        return output.float().sum() * 0.0, report

    def _forward(self, tokens: torch.Tensor, labels: torch.Tensor, positions: list[int]) -> Scores:
        b, n = tokens.shape
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        if n % cp:
            raise ValueError(f"sequence length {n} is not divisible by the context-parallel size {cp}")
        batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(n).expand(b, n)}
        local = split_batch_for_context_parallel(batch, cp_rank, cp)
        local = {k: v.to(self.device) for k, v in local.items()}

        def forward_step(iterator, model):
            micro = next(iterator)
            output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
            return output, partial(self._collect, positions, cp_rank * (n // cp))

        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([local]),
            model=self.model,
            num_microbatches=1,
            seq_length=n,
            micro_batch_size=b,
            forward_only=True,
        )
        self._hidden = None
        vocab = self._output_weight().shape[0] * ps.get_tensor_model_parallel_world_size()
        losses = torch.empty(b, n, dtype=torch.float32, device=self.device)
        logits = torch.empty(b, len(positions), vocab, dtype=torch.float32, device=self.device)
        if ps.is_pipeline_last_stage():
            (report,) = reports
            if cp > 1:
                parts = [torch.empty_like(report["losses"]) for _ in range(cp)]
                dist.all_gather(parts, report["losses"].contiguous(), group=ps.get_context_parallel_group())
                losses.copy_(torch.cat(parts, dim=1))
            else:
                losses.copy_(report["losses"])
            if positions:
                logits.copy_(report["logits"])
        if ps.get_pipeline_model_parallel_world_size() > 1:
            src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
            dist.broadcast(losses, src=src, group=group)
            if positions:
                dist.broadcast(logits, src=src, group=group)
        return Scores(losses.cpu(), logits.cpu() if positions else None)
