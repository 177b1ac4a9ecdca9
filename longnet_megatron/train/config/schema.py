"""The training job's schema: one typed tree of dataclasses, every field documented.

Every field below is a ``section.field=value`` override on the command line (:mod:`.overrides`);
docs/training.md has the same schema as a table. Checks live in :mod:`.validation`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from longnet_megatron.parallel.layout import ParallelLayout


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key (``section.field``)."""


@dataclass
class ModelConfig:
    """Architecture: a preset from longnet_megatron.model.PRESETS, optionally changed field by field."""

    preset: str = "tiny"  # tiny, 125m, 350m, 760m, 1.3b, 2.7b
    num_layers: int | None = None  # None: the preset's
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None  # kv heads (GQA); None: the preset's (MHA for GPT-3 sizes)
    ffn_hidden_size: int | None = None
    seq_length: int | None = None  # L, tokens per sample; None: the data's packed L (or the preset's)
    segment_lengths: list[int] | None = None  # dilated patterns w_i; None: the preset's
    dilation_rates: list[int] | None = None  # r_i, one per w_i
    vocab_size: int | None = None  # None: the tokenizer's (real data) or the preset's (synthetic)
    attention_backend: str = (
        "auto"  # any name of attention.backend_names(): auto, fa4, sdpa, te, triton, triton-fused, ...
    )
    use_te: bool | None = None  # Transformer Engine layers; None: when TE imports
    # auto: the least recomputation whose modelled footprint fits the GPU (train/memory_plan.py; none on
    # CPU); none, selective (core attention), full (whole layers: recompute_method, recompute_num_layers)
    recompute: str = "auto"
    recompute_method: str = "uniform"  # full recompute: uniform or block
    recompute_num_layers: int = 1  # full recompute: layers per checkpointed group (uniform) / count (block)
    # Each layer's MLP in chunks of this many tokens, each under an activation checkpoint (backward keeps
    # one chunk's fc1/GeLU outputs; one more MLP forward); null: the planner's choice under auto, else
    # off; 0: off. Not with model.fp8
    mlp_chunk_tokens: int | None = None
    # The saved inputs of the first k checkpointed layers in pinned host memory (model.recompute=full,
    # one pipeline stage); under auto the planner chooses k and this stays 0
    offload_layer_inputs: int = 0
    # FP8 GEMMs in the Transformer Engine linears (the dilated core attention stays bf16): null (off),
    # delayed, tensorwise or blockwise (TE's recipes on Hopper); needs TE layers, bf16, compute capability 8.9+
    fp8: str | None = None
    fp8_format: str = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients; e4m3: e4m3 everywhere
    fp8_amax_history_len: int = 1024  # delayed scaling: amax history window (TE's default)
    fp8_amax_compute_algo: str = "max"  # delayed scaling: max or most_recent over the history
    fp8_margin: int = 0  # delayed scaling: scale margin (powers of 2)
    hidden_dropout: float = 0.0
    # Output layer + loss in chunks of this many tokens, never holding the logits (docs/model.md);
    # None: 4096 when one micro-batch's fp32 logits on a rank would pass 1 GiB, else off; 0: off.
    loss_chunk_tokens: int | None = None


@dataclass
class ParallelConfig:
    """How the world is split; data parallelism takes what is left: dp = world / (tp * pp * cp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # interleaved 1F1B chunks per pipeline rank
    context_parallel_size: int = 1  # LongNet's contiguous sequence split
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tp > 1)
    use_distributed_optimizer: bool = True  # ZeRO-1: optimizer state sharded over data-parallel ranks
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class DataConfig:
    """Packed datasets from ``longnet-prep pack`` (or synthetic random tokens for throughput runs)."""

    prefixes: list[str] = field(default_factory=list)  # output prefixes of `longnet-prep pack`
    weights: list[float] | None = None  # blend weights, one per prefix; None: one prefix, or equal
    synthetic: bool = False  # random tokens instead of data: for throughput runs only
    cache_dir: str | None = None  # GPTDataset index cache; None: next to each dataset
    num_workers: int = 0  # DataLoader worker processes per rank
    # Document masking (docs/design.md section 7): a token attends only tokens of its own document
    # (documents end with the end-of-document token); off is the LongNet paper's setting.
    document_masking: bool = False
    reset_position_ids: bool = False  # RoPE positions restart at 0 after each end-of-document token
    synthetic_document_length: int = 0  # synthetic data: mean document length (tokens); 0: no documents


@dataclass
class TrainConfig:
    """Steps, batch and precision."""

    steps: int = 300  # optimizer steps
    micro_batch_size: int = 1  # samples per forward pass per data-parallel rank
    global_batch_size: int = 8  # samples per step; micro-batches = gbs / (mbs * dp)
    precision: str = "fp32"  # fp32, bf16, fp16
    seed: int = 1234
    eval_interval: int = 100  # steps between validations; 0: never
    eval_iters: int = 2  # global batches per validation
    exit_signal_handling: bool = True  # SIGTERM/SIGUSR1: checkpoint, then exit with REQUEUE_EXIT_CODE


@dataclass
class EvalConfig:
    """Periodic loss by token position (log-spaced buckets) on held-out packed sequences."""

    interval: int = 0  # steps between evaluations (and at the end); 0: never
    sequences: int = 4  # the first N sequences of the split, shared over data-parallel replicas
    prefix: str | None = None  # a `longnet-prep pack` prefix at the model's L; None: data.prefixes[0]
    split: str = "valid"  # train, valid or test


@dataclass
class OptimConfig:
    """Adam(W) through Megatron's get_megatron_optimizer, lr by Megatron's OptimizerParamScheduler."""

    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # the decay's floor
    warmup_steps: int = 20  # linear warmup from 0
    decay_steps: int | None = None  # None: train.steps
    decay_style: str = "cosine"  # cosine, linear, constant, inverse-square-root
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clipping; 0: off
    loss_scale: float | None = None  # fp16: a fixed scale; None: dynamic


@dataclass
class CheckpointConfig:
    """megatron.core.dist_checkpointing saves, kept last-K, resumed from the ``latest`` marker."""

    dir: str | None = None  # None: <run.dir>/checkpoints
    interval: int = 100  # steps between saves; 0: only at the end and on signals
    keep_last: int = 3  # older checkpoints are deleted after a newer save completes; 0: keep all
    resume: bool = True  # start from <dir>/latest when it exists
    load: str | None = None  # an explicit checkpoint directory to start from (weights, optimizer, ...)
    # Weights only, when nothing is resumed: a checkpoint or run directory saved in ANY parallel layout
    # (another run, `longnet-convert reshard` / `from-hf` output). Optimizer, scheduler and data start
    # fresh, as Megatron-LM's --finetune does.
    init_from: str | None = None
    save_at_end: bool = True
    optimizer_sharding: str = (
        "dp_reshardable"  # distributed-optimizer format: dp_reshardable, fully_reshardable
    )
    # Write shards in background processes while training goes on; `latest` moves only once every
    # rank's write completed (Megatron's async dist-checkpoint save)
    async_save: bool = False


@dataclass
class LoggingConfig:
    """Console line, TensorBoard and metrics.jsonl in the run directory."""

    interval: int = 10  # steps per console line / metrics record
    tensorboard: bool = True
    peak_tflops: float | None = (
        None  # per-GPU peak for MFU; None: known GPUs (H100/H200 bf16 989), else no MFU
    )


@dataclass
class RunConfig:
    """Where the run writes (logs, metrics, config, checkpoints by default)."""

    name: str = "longnet"
    dir: str | None = None  # None: runs/<name>
    timeout_minutes: int = 30  # collective timeout


@dataclass
class JobConfig:
    """The whole training job."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ derived values

    @property
    def run_dir(self) -> str:
        return self.run.dir or os.path.join("runs", self.run.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def layout(self) -> ParallelLayout:
        """The model-parallel sizes of ``parallel``."""
        p = self.parallel
        return ParallelLayout(
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            cp=p.context_parallel_size,
            vpp=p.virtual_pipeline_model_parallel_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ dotted access

    def get(self, key: str) -> Any:
        section, name = _split_key(self, key)
        return getattr(getattr(self, section), name)


def _section_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _split_key(job: JobConfig, key: str) -> tuple[str, str]:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{key!r}: keys have the form section.field, e.g. train.steps")
    section, name = parts
    if section not in _section_names(job):
        raise ConfigError(
            f"unknown section {section!r} in {key!r}{_did_you_mean(section, _section_names(job))}"
        )
    fields = _section_names(getattr(job, section))
    if name not in fields:
        raise ConfigError(f"unknown key {key!r}{_did_you_mean(name, fields, prefix=section + '.')}")
    return section, name


def _did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(choices)}"
