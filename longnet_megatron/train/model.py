"""The LongNet GPTModel of a job, as this rank's pipeline chunks wrapped in Megatron's DDP.

Mirrors Megatron-LM's ``get_model``: one chunk per virtual pipeline stage, each built by
``build_longnet_gpt`` with its pre/post-process flags, moved to the device and wrapped in
``megatron.core.distributed.DistributedDataParallel`` (contiguous gradient buffers, bucketed all-reduce
or reduce-scatter for the distributed optimizer).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import unwrap_model

from longnet_megatron.model import build_longnet_gpt, make_longnet_config
from longnet_megatron.model.specs import transformer_engine_available
from longnet_megatron.train.fp8 import fp8_config_fields
from longnet_megatron.train.job import ResolvedJob
from longnet_megatron.train.memory_plan import Recompute, explicit_recompute

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# model.loss_chunk_tokens=null: chunk the loss when a micro-batch's fp32 logits on a rank pass 1 GiB.
AUTO_LOSS_CHUNK_TOKENS = 4096
AUTO_LOSS_CHUNK_ABOVE_BYTES = 2**30


def loss_chunk_tokens(resolved: ResolvedJob) -> int | None:
    """``model.loss_chunk_tokens`` resolved: None (Megatron's plain output layer + loss) or tokens per chunk.

    Automatic (null): on when one micro-batch's logits on one rank, (mbs x L / cp) tokens x V / tp in
    fp32 (the softmax Megatron's cross-entropy keeps for backward), would pass 1 GiB.
    """
    job, layout = resolved.config, resolved.layout
    value = job.model.loss_chunk_tokens
    if value is not None:
        return value or None
    tokens = job.train.micro_batch_size * resolved.seq_length // layout.cp
    vocab = resolved.padded_vocab_size() // layout.tp
    return AUTO_LOSS_CHUNK_TOKENS if 4 * tokens * vocab > AUTO_LOSS_CHUNK_ABOVE_BYTES else None


def uses_transformer_engine(resolved: ResolvedJob) -> bool:
    """``model.use_te`` resolved: TE layers when asked for, or (null) whenever TE imports."""
    use_te = resolved.config.model.use_te
    return use_te if use_te is not None else transformer_engine_available()


def transformer_config(
    resolved: ResolvedJob, extra: dict[str, Any] | None = None, recompute: Recompute | None = None
) -> Any:
    """The LongNetConfig (a Megatron TransformerConfig) of the job; ``extra`` sets further fields.

    recompute: the memory plan's choice (:mod:`.memory_plan`); None: ``model.recompute`` as given
    (``auto`` then means none, as on CPU).
    """
    job = resolved.config
    precision, m, p = job.train.precision, job.model, job.parallel
    dtype = DTYPES[precision]
    overrides: dict[str, Any] = {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "hidden_dropout": m.hidden_dropout,
        "sequence_parallel": p.sequence_parallel,
        # Loss = sum over tokens; the schedule adds token counts and finalize_model_grads divides the
        # gradients by the global count: the exact per-token mean whatever the micro-batching.
        "calculate_per_token_loss": True,
        "loss_chunk_tokens": loss_chunk_tokens(resolved),
    }
    overrides.update((recompute or explicit_recompute(resolved)).config_fields())
    overrides.update(fp8_config_fields(m))
    overrides.update(extra or {})
    return make_longnet_config(resolved.preset, attention_backend_name=m.attention_backend, **overrides)


def build_model_chunks(
    resolved: ResolvedJob, config, device: torch.device, layer_spec: Any = None
) -> list[torch.nn.Module]:
    """This rank's chunks (one per virtual pipeline stage) wrapped in Megatron's DDP (and Float16Module
    under bf16/fp16, as Megatron-LM's get_model does); :func:`unwrap` returns the GPTModels.

    layer_spec: another transformer layer spec than LongNet's (a dense baseline); None: LongNet's.
    """
    job = resolved.config
    vpp = job.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        module = build_longnet_gpt(
            resolved.preset,
            config=config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            use_te=uses_transformer_engine(resolved),
            layer_spec=layer_spec,
        )
        module = module.to(device)
        if job.train.precision != "fp32":
            # Casts the first stage's inputs to bf16/fp16 and the last stage's outputs back to fp32.
            module = Float16Module(config, module)
        chunks.append(module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=job.parallel.overlap_grad_reduce,
        overlap_param_gather=job.parallel.overlap_param_gather,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def unwrap(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The GPTModels inside DDP / Float16Module wrappers."""
    return unwrap_model(chunks)
