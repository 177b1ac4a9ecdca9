"""The training job's configuration: one typed tree of dataclasses, read from YAML, overridden on the
command line with dotted keys, and checked before any process group starts.

    cfg = load_config("configs/tiny_cpu.yaml", ["train.steps=50", "parallel.tensor_model_parallel_size=2"])
    cfg.validate(world_size=2)      # ConfigError naming the key on any inconsistency

Every field below is a documented dataclass field and a ``section.field=value`` override; values are
parsed as YAML (``optim.lr=3e-4``, ``data.prefixes=[a,b]``, ``model.use_te=null``). docs/training.md
has the same schema as a table.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


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
    attention_backend: str = "auto"  # auto, reference, te, sdpa, triton
    use_te: bool | None = None  # Transformer Engine layers; None: when TE imports
    recompute: str = "none"  # none, selective (core attention), full (whole layers)
    recompute_method: str = "uniform"  # full recompute: uniform or block
    recompute_num_layers: int = 1  # full recompute: layers per checkpointed group (uniform) / count (block)
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

    def model_parallel_size(self) -> int:
        p = self.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def num_microbatches(self, world_size: int) -> int:
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.data_parallel_size(world_size)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation

    def validate(self, world_size: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the key of the first inconsistency.

        Runs before any process group starts. ``world_size`` (from the launcher's environment) enables
        the checks that depend on it; the sequence-length checks read the data's pack summary.
        """
        from longnet_megatron.attention import DilatedAttentionConfig
        from longnet_megatron.model.presets import PRESETS

        m, p, t, o, c = self.model, self.parallel, self.train, self.optim, self.checkpoint
        _choice("model.preset", m.preset, sorted(PRESETS))
        _choice("model.attention_backend", m.attention_backend, ("auto", "reference", "te", "sdpa", "triton"))
        _choice("model.recompute", m.recompute, ("none", "selective", "full"))
        _choice("model.recompute_method", m.recompute_method, ("uniform", "block"))
        _choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
        _choice("optim.decay_style", o.decay_style, ("cosine", "linear", "constant", "inverse-square-root"))
        _choice(
            "checkpoint.optimizer_sharding", c.optimizer_sharding, ("dp_reshardable", "fully_reshardable")
        )
        for key in ("checkpoint.load", "checkpoint.init_from"):
            path = self.get(key)
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"{key}={path} is not a directory (a checkpoint or run directory)")
        for key in (
            "parallel.tensor_model_parallel_size",
            "parallel.pipeline_model_parallel_size",
            "parallel.context_parallel_size",
            "train.steps",
            "train.micro_batch_size",
            "train.global_batch_size",
            "model.recompute_num_layers",
        ):
            _positive(key, self.get(key))
        for key in (
            "train.eval_interval",
            "train.eval_iters",
            "checkpoint.interval",
            "checkpoint.keep_last",
            "optim.warmup_steps",
            "data.num_workers",
        ):
            if self.get(key) < 0:
                raise ConfigError(f"{key}={self.get(key)} must be >= 0")
        for key in (
            "model.num_layers",
            "model.hidden_size",
            "model.num_attention_heads",
            "model.num_query_groups",
            "model.ffn_hidden_size",
            "model.seq_length",
            "model.vocab_size",
            "parallel.virtual_pipeline_model_parallel_size",
            "optim.decay_steps",
        ):
            if self.get(key) is not None:
                _positive(key, self.get(key))
        if m.loss_chunk_tokens is not None and m.loss_chunk_tokens < 0:
            raise ConfigError(
                f"model.loss_chunk_tokens={m.loss_chunk_tokens} must be >= 0 (0: off; null: automatic)"
            )
        if not 0.0 <= m.hidden_dropout < 1.0:
            raise ConfigError(f"model.hidden_dropout={m.hidden_dropout} must be in [0, 1)")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr={o.min_lr} and optim.lr={o.lr} need 0 <= min_lr <= lr, lr > 0")
        if o.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad={o.clip_grad} must be >= 0 (0: no clipping)")
        if o.warmup_steps >= (o.decay_steps or t.steps):
            raise ConfigError(
                f"optim.warmup_steps={o.warmup_steps} must be shorter than the decay "
                f"(optim.decay_steps={o.decay_steps or t.steps})"
            )

        arch = self.architecture()
        heads, groups, layers = arch["num_attention_heads"], arch["num_query_groups"], arch["num_layers"]
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        if arch["hidden_size"] % heads:
            raise ConfigError(
                f"model.hidden_size={arch['hidden_size']} is not divisible by model.num_attention_heads={heads}"
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
        vpp = p.virtual_pipeline_model_parallel_size
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
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2"
            )
        if p.overlap_param_gather and not p.use_distributed_optimizer:
            raise ConfigError(
                "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"
            )
        try:
            DilatedAttentionConfig(tuple(arch["segment_lengths"]), tuple(arch["dilation_rates"]))
        except ValueError as e:
            raise ConfigError(f"model.segment_lengths / model.dilation_rates: {e}") from None

        self._validate_data()
        seq = self.seq_length()
        if seq % cp:
            raise ConfigError(
                f"model.seq_length={seq} is not divisible by parallel.context_parallel_size={cp}"
            )
        if p.sequence_parallel and (seq // cp) % tp:
            raise ConfigError(
                f"model.seq_length={seq} / parallel.context_parallel_size={cp} is not divisible by "
                f"parallel.tensor_model_parallel_size={tp} (sequence parallelism splits it)"
            )
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        if world_size is not None:
            mp = tp * pp * cp
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
            if vpp is not None and self.num_microbatches(world_size) % pp:
                raise ConfigError(
                    f"interleaved pipelining needs the micro-batches per step "
                    f"({self.num_microbatches(world_size)}) to be a multiple of "
                    f"parallel.pipeline_model_parallel_size={pp}: change train.global_batch_size"
                )

    def _validate_data(self) -> None:
        d = self.data
        # Document masking and per-document positions need documents: end-of-document tokens.
        if d.synthetic_document_length < 0:
            raise ConfigError(f"data.synthetic_document_length={d.synthetic_document_length} must be >= 0")
        wants = [k for k in ("data.document_masking", "data.reset_position_ids") if self.get(k)]
        if wants and d.synthetic and not d.synthetic_document_length:
            raise ConfigError(
                f"{wants[0]}=true needs documents, and data.synthetic=true gives one stream of random "
                "tokens: set data.synthetic_document_length (mean tokens per document) or train on packed data"
            )
        for i, prefix in enumerate([] if d.synthetic or not wants else d.prefixes):
            meta = prefix + "_train.meta.json"
            if os.path.exists(meta) and _read_json(meta).get("eod_id") is None:
                raise ConfigError(
                    f"{wants[0]}=true needs end-of-document tokens, and data.prefixes[{i}]={prefix!r} has none "
                    f"({meta} names no eod_id): pack it with `longnet-prep pack`"
                )
        if d.synthetic:
            return
        if not d.prefixes:
            raise ConfigError(
                "data.prefixes is empty: give the output prefix of `longnet-prep pack` "
                "(or data.synthetic=true for a throughput run on random tokens)"
            )
        if d.weights is not None:
            if len(d.weights) != len(d.prefixes):
                raise ConfigError(
                    f"data.weights has {len(d.weights)} entries for {len(d.prefixes)} data.prefixes"
                )
            if any(w < 0 for w in d.weights) or sum(d.weights) <= 0:
                raise ConfigError(f"data.weights={d.weights} must be non-negative with a positive sum")
        lengths = {}
        for i, prefix in enumerate(d.prefixes):
            summary = prefix + ".pack.json"
            if not os.path.exists(summary):
                raise ConfigError(
                    f"data.prefixes[{i}]={prefix!r}: {summary} does not exist; "
                    "give the --output prefix of `longnet-prep pack`"
                )
            lengths[prefix] = _read_json(summary)["seq_length"]
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"data.prefixes are packed for different sequence lengths: {lengths}")
        packed = next(iter(lengths.values()))
        if self.model.seq_length is not None and self.model.seq_length != packed:
            raise ConfigError(
                f"model.seq_length={self.model.seq_length} differs from the data's packed length {packed} "
                f"({d.prefixes[0]}.pack.json): pack again or drop the override"
            )

    # ------------------------------------------------------------------ resolved architecture

    def seq_length(self) -> int:
        """L: the override, else the packed data's L, else the preset's."""
        if self.model.seq_length is not None:
            return self.model.seq_length
        if not self.data.synthetic and self.data.prefixes:
            summary = self.data.prefixes[0] + ".pack.json"
            if os.path.exists(summary):
                return int(_read_json(summary)["seq_length"])
        from longnet_megatron.model.presets import get_preset

        return get_preset(self.model.preset).seq_length

    def architecture(self) -> dict[str, Any]:
        """The preset's shape with this config's overrides applied (no vocabulary: see the trainer)."""
        from longnet_megatron.model.presets import get_preset

        preset = get_preset(self.model.preset)
        out = {
            "num_layers": preset.num_layers,
            "hidden_size": preset.hidden_size,
            "num_attention_heads": preset.num_attention_heads,
            "num_query_groups": preset.num_query_groups,
            "ffn_hidden_size": preset.ffn_hidden_size,
            "segment_lengths": list(preset.dilated_attention.segment_lengths),
            "dilation_rates": list(preset.dilated_attention.dilation_rates),
        }
        for key in out:
            value = getattr(self.model, key)
            if value is not None:
                out[key] = value
        return out

    # ------------------------------------------------------------------ dotted access

    def get(self, key: str) -> Any:
        section, name = _split_key(self, key)
        return getattr(getattr(self, section), name)


def _read_json(path: str) -> dict[str, Any]:
    import json

    with open(path) as f:
        return json.load(f)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


# ---------------------------------------------------------------------- YAML, overrides, types


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


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against (and, for YAML's int-for-float, converted to) the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} cannot be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a schema bug, not a user error


def set_value(job: JobConfig, key: str, value: Any) -> None:
    """Set ``section.field`` to ``value`` (type-checked), naming the key on error."""
    section, name = _split_key(job, key)
    target = getattr(job, section)
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key.strip()}: cannot read {raw!r} ({e})") from None
    return key.strip(), value


def config_from_dict(data: dict[str, Any], job: JobConfig | None = None) -> JobConfig:
    """Apply a nested dict (a YAML document, or a checkpoint's saved config) onto ``job``."""
    job = job or JobConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in _section_names(job):
            raise ConfigError(f"unknown section {section!r}{_did_you_mean(section, _section_names(job))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of field: value")
        for name, value in values.items():
            set_value(job, f"{section}.{name}", value)
    return job


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """The config of YAML file ``path`` (None: all defaults) with ``key=value`` overrides applied in order."""
    job = JobConfig()
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
        config_from_dict(data, job)
    for text in overrides:
        set_value(job, *parse_override(text))
    return job


def dump_config(job: JobConfig, path: str) -> None:
    """Write ``job`` as YAML (the run directory's resolved config)."""
    with open(path, "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)
