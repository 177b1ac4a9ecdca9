"""The LongNet GPTModel of a job, as this rank's pipeline chunks wrapped in Megatron's DDP.

Mirrors Megatron-LM's ``get_model``: one chunk per virtual pipeline stage, each built by
``build_longnet_gpt`` with its pre/post-process flags, moved to the device and wrapped in
``megatron.core.distributed.DistributedDataParallel`` (contiguous gradient buffers, bucketed all-reduce
or reduce-scatter for the distributed optimizer).
"""

from __future__ import annotations

from typing import Any

import torch

from longnet_megatron.train.config import JobConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# model.loss_chunk_tokens=null: chunk the loss when a micro-batch's fp32 logits on a rank pass 1 GiB.
AUTO_LOSS_CHUNK_TOKENS = 4096
AUTO_LOSS_CHUNK_ABOVE_BYTES = 2**30


def resolve_preset(job: JobConfig, vocab_size: int | None):
    """The preset with the job's architecture overrides, L and vocabulary."""
    from longnet_megatron.attention import DilatedAttentionConfig
    from longnet_megatron.model import get_preset

    arch = job.architecture()
    preset = get_preset(job.model.preset)
    vocab = job.model.vocab_size or vocab_size or preset.vocab_size
    if vocab_size is not None and vocab < vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary {vocab_size}")
    return preset.replace(
        num_layers=arch["num_layers"],
        hidden_size=arch["hidden_size"],
        num_attention_heads=arch["num_attention_heads"],
        num_query_groups=arch["num_query_groups"],
        ffn_hidden_size=arch["ffn_hidden_size"],
        seq_length=job.seq_length(),
        dilated_attention=DilatedAttentionConfig(
            tuple(arch["segment_lengths"]), tuple(arch["dilation_rates"])
        ),
        vocab_size=vocab,
    )


def loss_chunk_tokens(job: JobConfig, preset) -> int | None:
    """``model.loss_chunk_tokens`` resolved: None (Megatron's plain output layer + loss) or tokens per chunk.

    Automatic (null): on when one micro-batch's logits on one rank, (mbs x L / cp) tokens x V / tp in
    fp32 (the softmax Megatron's cross-entropy keeps for backward), would pass 1 GiB.
    """
    value = job.model.loss_chunk_tokens
    if value is not None:
        return value or None
    p = job.parallel
    tokens = job.train.micro_batch_size * preset.seq_length // p.context_parallel_size
    vocab = preset.padded_vocab_size(p.tensor_model_parallel_size) // p.tensor_model_parallel_size
    return AUTO_LOSS_CHUNK_TOKENS if 4 * tokens * vocab > AUTO_LOSS_CHUNK_ABOVE_BYTES else None


def transformer_config(job: JobConfig, preset, extra: dict[str, Any] | None = None) -> Any:
    """The LongNetConfig (a Megatron TransformerConfig) of the job; ``extra`` sets further fields."""
    from longnet_megatron.model import make_longnet_config

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
        "loss_chunk_tokens": loss_chunk_tokens(job, preset),
    }
    if m.recompute == "selective":
        overrides.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif m.recompute == "full":
        overrides.update(
            recompute_granularity="full",
            recompute_method=m.recompute_method,
            recompute_num_layers=m.recompute_num_layers,
        )
    overrides.update(extra or {})
    return make_longnet_config(preset, attention_backend_name=m.attention_backend, **overrides)


def build_model_chunks(
    job: JobConfig, preset, config, device: torch.device, layer_spec: Any = None
) -> list[torch.nn.Module]:
    """This rank's chunks (one per virtual pipeline stage) wrapped in Megatron's DDP (and Float16Module
    under bf16/fp16, as Megatron-LM's get_model does); :func:`unwrap` returns the GPTModels.

    layer_spec: another transformer layer spec than LongNet's (a dense baseline); None: LongNet's.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from longnet_megatron.model import build_longnet_gpt

    vpp = job.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        module = build_longnet_gpt(
            preset,
            config=config,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            use_te=job.model.use_te,
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
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunks)
