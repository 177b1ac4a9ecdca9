"""Checks of a job that need no file and no process group: every error names its ``section.field``.

:func:`validate_job` runs on the parsed config and the model preset it selects; the checks that need
the data (sequence length, vocabulary) run in :func:`longnet_megatron.train.job.resolve_job`, which
calls this first. Both run before any process group starts.
"""

from __future__ import annotations

import math
import os
from typing import Any

from data_prep.pack import SPLITS, summary_path
from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.attention.backends import WHOLE_FUNCTION_BACKENDS, backend_names
from longnet_megatron.model.presets import PRESETS, LongNetPreset
from longnet_megatron.train.config.schema import ConfigError, JobConfig

RECOMPUTE = ("auto", "none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
PRECISIONS = ("fp32", "bf16", "fp16")
DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
OPTIMIZER_SHARDING = ("dp_reshardable", "fully_reshardable")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")  # Transformer Engine's FP8 recipes on Hopper
FP8_FORMATS = ("hybrid", "e4m3")
FP8_AMAX_ALGOS = ("max", "most_recent")

_POSITIVE = (
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.context_parallel_size",
    "train.steps",
    "train.micro_batch_size",
    "train.global_batch_size",
    "model.recompute_num_layers",
    "model.fp8_amax_history_len",
    "logging.interval",
    "eval.sequences",
)
_NON_NEGATIVE = (
    "train.eval_interval",
    "train.eval_iters",
    "eval.interval",
    "checkpoint.interval",
    "checkpoint.keep_last",
    "optim.warmup_steps",
    "data.num_workers",
    "model.fp8_margin",
    "model.offload_layer_inputs",
)
_POSITIVE_OR_NULL = (
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.ffn_hidden_size",
    "model.seq_length",
    "model.vocab_size",
    "parallel.virtual_pipeline_model_parallel_size",
    "optim.decay_steps",
)
_FINITE = (
    "optim.lr",
    "optim.min_lr",
    "optim.weight_decay",
    "optim.adam_beta1",
    "optim.adam_beta2",
    "optim.adam_eps",
    "optim.clip_grad",
    "model.hidden_dropout",
)


def choice(key: str, value: Any, choices) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def positive(key: str, value: Any) -> None:
    """Raise unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def validate_job(job: JobConfig, preset: LongNetPreset) -> None:
    """Raise :class:`ConfigError` naming the key of the first inconsistency of ``job``.

    ``preset`` is the job's model preset with its architecture overrides (``job.model_preset``).
    """
    _validate_values(job)
    _validate_parallel(job, preset)
    _validate_memory_savers(job, preset)
    for key in ("checkpoint.load", "checkpoint.init_from"):
        path = job.get(key)
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"{key}={path} is not a directory (a checkpoint or run directory)")
    if job.checkpoint.load and job.checkpoint.init_from:
        raise ConfigError(
            "checkpoint.load (resume everything) and checkpoint.init_from (weights only) exclude each other"
        )
    if not job.data.synthetic and not job.data.prefixes:
        raise ConfigError(
            "data.prefixes is empty: give the output prefix of `longnet-prep pack` "
            "(or data.synthetic=true for a throughput run on random tokens)"
        )
    if job.eval.interval and job.eval.prefix and not os.path.exists(summary_path(job.eval.prefix)):
        raise ConfigError(
            f"eval.prefix={job.eval.prefix}: {summary_path(job.eval.prefix)} does not exist; give the "
            "output prefix of `longnet-prep pack`"
        )
    if job.eval.interval and job.data.synthetic and not job.eval.prefix:
        raise ConfigError("eval.interval needs eval.prefix with data.synthetic=true (no held-out data)")
    d = job.data
    # Document masking and per-document positions need documents (end-of-document tokens); packed
    # data's are checked with its metadata in train.job.resolve_job.
    if d.synthetic_document_length < 0:
        raise ConfigError(f"data.synthetic_document_length={d.synthetic_document_length} must be >= 0")
    wants = document_keys(job)
    if wants and d.synthetic and not d.synthetic_document_length:
        raise ConfigError(
            f"{wants[0]}=true needs documents, and data.synthetic=true gives one stream of random "
            "tokens: set data.synthetic_document_length (mean tokens per document) or train on packed data"
        )
    if d.weights is not None:
        if len(d.weights) != len(d.prefixes):
            raise ConfigError(
                f"data.weights has {len(d.weights)} entries for {len(d.prefixes)} data.prefixes"
            )
        if any(not math.isfinite(w) or w < 0 for w in d.weights) or sum(d.weights) <= 0:
            raise ConfigError(f"data.weights={d.weights} must be finite, non-negative, with a positive sum")


def document_keys(job: JobConfig) -> list[str]:
    """The data.* options that are on and need documents (document masking, per-document positions)."""
    return [k for k in ("data.document_masking", "data.reset_position_ids") if job.get(k)]


def _validate_values(job: JobConfig) -> None:
    m, t, o, c = job.model, job.train, job.optim, job.checkpoint
    choice("model.preset", m.preset, sorted(PRESETS))
    choice("model.attention_backend", m.attention_backend, backend_names())
    choice("model.recompute", m.recompute, RECOMPUTE)
    choice("model.recompute_method", m.recompute_method, RECOMPUTE_METHODS)
    choice("train.precision", t.precision, PRECISIONS)
    choice("optim.decay_style", o.decay_style, DECAY_STYLES)
    choice("checkpoint.optimizer_sharding", c.optimizer_sharding, OPTIMIZER_SHARDING)
    choice("eval.split", job.eval.split, SPLITS)
    for key in _POSITIVE:
        positive(key, job.get(key))
    for key in _NON_NEGATIVE:
        if job.get(key) < 0:
            raise ConfigError(f"{key}={job.get(key)} must be >= 0")
    for key in _POSITIVE_OR_NULL:
        if job.get(key) is not None:
            positive(key, job.get(key))
    for key in _FINITE:
        if not math.isfinite(job.get(key)):
            raise ConfigError(f"{key}={job.get(key)} must be a finite number")
    if m.loss_chunk_tokens is not None and m.loss_chunk_tokens < 0:
        raise ConfigError(
            f"model.loss_chunk_tokens={m.loss_chunk_tokens} must be >= 0 (0: off; null: automatic)"
        )
    _validate_fp8(job)
    if not 0.0 <= m.hidden_dropout < 1.0:
        raise ConfigError(f"model.hidden_dropout={m.hidden_dropout} must be in [0, 1)")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} and optim.lr={o.lr} need 0 <= min_lr <= lr, lr > 0")
    if o.clip_grad < 0:
        raise ConfigError(f"optim.clip_grad={o.clip_grad} must be >= 0 (0: no clipping)")
    if o.loss_scale is not None and not (math.isfinite(o.loss_scale) and o.loss_scale > 0):
        raise ConfigError(f"optim.loss_scale={o.loss_scale} must be a positive number (null: dynamic)")
    if o.warmup_steps >= (o.decay_steps or t.steps):
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be shorter than the decay "
            f"(optim.decay_steps={o.decay_steps or t.steps})"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}"
        )


def _validate_fp8(job: JobConfig) -> None:
    """FP8 runs the Transformer Engine linears: TE layers and bf16. The device (CUDA, compute
    capability, TE importable) is checked when the trainer starts: longnet_megatron.train.fp8."""
    m = job.model
    if m.fp8 is None:
        return
    choice("model.fp8", m.fp8, FP8_RECIPES)
    choice("model.fp8_format", m.fp8_format, FP8_FORMATS)
    choice("model.fp8_amax_compute_algo", m.fp8_amax_compute_algo, FP8_AMAX_ALGOS)
    if m.use_te is False:
        raise ConfigError(
            f"model.fp8={m.fp8} runs the Transformer Engine linears: it needs model.use_te=true (or null)"
        )
    if job.train.precision != "bf16":
        raise ConfigError(
            f"model.fp8={m.fp8} needs train.precision=bf16 (FP8 GEMMs keep bf16 weights and activations), "
            f"not {job.train.precision}"
        )


def _validate_memory_savers(job: JobConfig, preset: LongNetPreset) -> None:
    """The chunked MLP and layer-input offloading: what they need (docs/training.md, the memory planner)."""
    m, layout = job.model, job.layout
    if m.mlp_chunk_tokens is not None and m.mlp_chunk_tokens < 0:
        raise ConfigError(
            f"model.mlp_chunk_tokens={m.mlp_chunk_tokens} must be >= 0 (0: off; null: the planner's choice)"
        )
    if m.mlp_chunk_tokens and m.fp8 is not None:
        raise ConfigError(
            f"model.mlp_chunk_tokens={m.mlp_chunk_tokens} with model.fp8={m.fp8}: the chunks' activation "
            "checkpoints would replay Transformer Engine's FP8 amax updates; set model.mlp_chunk_tokens=0 "
            "or model.fp8=null"
        )
    k = m.offload_layer_inputs
    if not k:
        return
    if m.recompute == "auto":
        raise ConfigError(
            f"model.offload_layer_inputs={k} with model.recompute=auto: the planner chooses it there; "
            "set model.recompute=full to choose it yourself"
        )
    if m.recompute != "full":
        raise ConfigError(
            f"model.offload_layer_inputs={k} needs model.recompute=full, not {m.recompute} (only layers "
            "recomputed whole save just their inputs)"
        )
    if layout.pp > 1:
        raise ConfigError(
            f"model.offload_layer_inputs={k} runs on one pipeline stage only, not with "
            f"parallel.pipeline_model_parallel_size={layout.pp}"
        )
    layers, group = preset.num_layers, m.recompute_num_layers
    inputs = -(-layers // group) if m.recompute_method == "uniform" else min(group, layers)
    if k > inputs:
        raise ConfigError(
            f"model.offload_layer_inputs={k}: recompute {m.recompute_method} with "
            f"model.recompute_num_layers={group} saves {inputs} layer inputs of {layers} layers"
        )


def _validate_parallel(job: JobConfig, preset: LongNetPreset) -> None:
    p, layout = job.parallel, job.layout
    heads, layers = preset.num_attention_heads, preset.num_layers
    groups = preset.num_query_groups
    tp, pp, cp, vpp = layout.tp, layout.pp, layout.cp, layout.vpp
    if preset.hidden_size % heads:
        raise ConfigError(
            f"model.hidden_size={preset.hidden_size} is not divisible by model.num_attention_heads={heads}"
        )
    if heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={heads} is not divisible by parallel.tensor_model_parallel_size={tp}"
        )
    if groups is not None and heads % groups:
        raise ConfigError(
            f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}"
        )
    if groups is not None and groups % tp and tp % groups:
        raise ConfigError(
            f"model.num_query_groups={groups} and parallel.tensor_model_parallel_size={tp}: "
            "one must divide the other"
        )
    if layers % (pp * (vpp or 1)):
        what = f"parallel.pipeline_model_parallel_size={pp}" + (
            f" * parallel.virtual_pipeline_model_parallel_size={vpp}" if vpp else ""
        )
        raise ConfigError(f"model.num_layers={layers} is not divisible by {what}")
    if vpp is not None and pp < 2:
        raise ConfigError(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} needs parallel.pipeline_model_parallel_size >= 2"
        )
    if p.sequence_parallel and tp < 2:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    if cp > 1 and job.model.attention_backend in WHOLE_FUNCTION_BACKENDS:
        raise ConfigError(
            f"model.attention_backend={job.model.attention_backend} runs on one rank only; with "
            f"parallel.context_parallel_size={cp} choose a per-call kernel (auto, fa4, sdpa, te, triton)"
        )
    try:
        DilatedAttentionConfig(
            preset.dilated_attention.segment_lengths, preset.dilated_attention.dilation_rates
        )
    except ValueError as e:
        raise ConfigError(f"model.segment_lengths / model.dilation_rates: {e}") from None


def validate_world(job: JobConfig, world_size: int, seq_length: int) -> None:
    """The checks that need the launcher's world size and the resolved sequence length L."""
    t, p, layout = job.train, job.parallel, job.layout
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    if seq_length % cp:
        raise ConfigError(
            f"model.seq_length={seq_length} is not divisible by parallel.context_parallel_size={cp}"
        )
    if p.sequence_parallel and (seq_length // cp) % tp:
        raise ConfigError(
            f"model.seq_length={seq_length} / parallel.context_parallel_size={cp} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp} (sequence parallelism splits it)"
        )
    tokens = t.micro_batch_size * seq_length // cp // (tp if p.sequence_parallel else 1)
    if job.model.fp8 is not None and tokens % 16:
        raise ConfigError(
            f"model.fp8={job.model.fp8}: FP8 GEMMs need the tokens of a micro-batch on a rank "
            f"(train.micro_batch_size x model.seq_length / cp{' / tp' if p.sequence_parallel else ''} "
            f"= {tokens}) to be a multiple of 16"
        )
    mp = layout.model_parallel_size()
    if world_size % mp:
        raise ConfigError(
            f"the world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} "
            f"* parallel.pipeline_model_parallel_size={pp} * parallel.context_parallel_size={cp}"
        )
    dp = world_size // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} * data-parallel size {dp}"
        )
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if layout.vpp is not None and microbatches % pp:
        raise ConfigError(
            f"interleaved pipelining needs the micro-batches per step ({microbatches}) to be a multiple of "
            f"parallel.pipeline_model_parallel_size={pp}: change train.global_batch_size"
        )
