"""Megatron's optimizer (Adam, distributed over data-parallel ranks when asked) and its lr/wd scheduler."""

from __future__ import annotations

from typing import Any

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from longnet_megatron.train.config import JobConfig
from longnet_megatron.train.model import DTYPES


def build_optimizer(job: JobConfig, chunks: list[Any]):
    """``get_megatron_optimizer`` over the DDP-wrapped chunks (mixed precision, clipping, loss scale)."""
    o, precision = job.optim, job.train.precision
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=DTYPES[precision],
        loss_scale=o.loss_scale,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
        overlap_param_gather=job.parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(job: JobConfig, optimizer):
    """Megatron's OptimizerParamScheduler counting in optimizer steps: linear warmup from 0, then decay."""
    o = job.optim
    decay_steps = o.decay_steps or job.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # On resume the checkpoint's schedule wins (Megatron-LM's default).
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
