"""The job resolved once: config -> preset, sequence length, tokenizer, layout, data summaries.

Everything the trainer (and the tools around it) needs to know about a job before it starts is
decided here, in one place, before any process group starts::

    job = resolve_job(load_config("configs/tiny_cpu.yaml", overrides), world_size=2)
    job.preset            # the model: preset + the config's architecture overrides, L, vocabulary
    job.seq_length        # L: model.seq_length, else the data's packed L, else the preset's
    job.tokenizer         # the data's tokenizer description (None for synthetic data)
    job.layout            # tp, pp, cp, vpp; job.data_parallel_size, job.num_microbatches

Each dataset's pack summary (``<prefix>.pack.json``) is read once, through data_prep's reader; every
problem is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_prep.errors import PrepError
from data_prep.megatron_config import read_pack_summary
from data_prep.meta import meta_path, read_meta
from data_prep.pack import split_prefix
from data_prep.tokenizers import Tokenizer, TokenizerError, get_tokenizer
from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.model.presets import PRESETS, LongNetPreset, get_preset
from longnet_megatron.parallel.layout import ParallelLayout
from longnet_megatron.train.config.schema import ConfigError, JobConfig
from longnet_megatron.train.config.validation import choice, document_keys, validate_job, validate_world

# ModelConfig fields that override the preset's architecture one for one.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
)


@dataclass(frozen=True)
class ResolvedJob:
    """A validated job and everything derived from it (see the module docstring)."""

    config: JobConfig
    world_size: int
    preset: LongNetPreset
    tokenizer: dict[str, Any] | None
    pack_summaries: tuple[dict[str, Any], ...]

    @property
    def seq_length(self) -> int:
        return self.preset.seq_length

    @property
    def layout(self) -> ParallelLayout:
        return self.config.layout

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.layout.model_parallel_size()

    @property
    def num_microbatches(self) -> int:
        t = self.config.train
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    def padded_vocab_size(self) -> int:
        return self.preset.padded_vocab_size(self.layout.tp)


def model_preset(job: JobConfig) -> LongNetPreset:
    """The job's preset with its architecture and pattern overrides (L and vocabulary not yet set)."""
    m = job.model
    choice("model.preset", m.preset, sorted(PRESETS))
    preset = get_preset(m.preset)
    changes: dict[str, Any] = {
        name: getattr(m, name) for name in ARCHITECTURE_FIELDS if getattr(m, name) is not None
    }
    if m.segment_lengths is not None or m.dilation_rates is not None:
        patterns = preset.dilated_attention
        try:
            changes["dilated_attention"] = DilatedAttentionConfig(
                tuple(m.segment_lengths or patterns.segment_lengths),
                tuple(m.dilation_rates or patterns.dilation_rates),
            )
        except ValueError as e:
            raise ConfigError(f"model.segment_lengths / model.dilation_rates: {e}") from None
    return preset.replace(**changes)


def _read_summaries(job: JobConfig) -> tuple[dict[str, Any], ...]:
    summaries = []
    for i, prefix in enumerate(job.data.prefixes):
        try:
            summaries.append(read_pack_summary(prefix))
        except PrepError as e:
            raise ConfigError(f"data.prefixes[{i}]={prefix!r}: {e.message}") from None
    lengths = {p: s["seq_length"] for p, s in zip(job.data.prefixes, summaries)}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"data.prefixes are packed for different sequence lengths: {lengths}")
    tokenizers = {repr(s["tokenizer"]) for s in summaries}
    if len(tokenizers) > 1:
        raise ConfigError(f"data.prefixes were tokenized with different tokenizers: {sorted(tokenizers)}")
    wants = document_keys(job)
    for i, prefix in enumerate(job.data.prefixes if wants else []):
        meta = meta_path(split_prefix(prefix, "train"))
        try:
            eod = read_meta(split_prefix(prefix, "train")).get("eod_id")
        except PrepError as e:
            raise ConfigError(f"data.prefixes[{i}]={prefix!r}: {e.message}") from None
        if eod is None:
            raise ConfigError(
                f"{wants[0]}=true needs end-of-document tokens, and data.prefixes[{i}]={prefix!r} has none "
                f"({meta} names no eod_id): pack it with `longnet-prep pack`"
            )
    return tuple(summaries)


def _tokenizer(description: dict[str, Any], prefix: str) -> Tokenizer:
    try:
        return get_tokenizer(description)
    except TokenizerError as e:
        raise ConfigError(f"data.prefixes[0]={prefix!r}: its tokenizer cannot be loaded here: {e}") from None


def resolve_job(job: JobConfig, world_size: int) -> ResolvedJob:
    """Validate ``job`` for ``world_size`` ranks and resolve it; :class:`ConfigError` names the key."""
    preset = model_preset(job)
    validate_job(job, preset)
    summaries: tuple[dict[str, Any], ...] = ()
    tokenizer = None
    data_vocab = None
    if not job.data.synthetic:
        summaries = _read_summaries(job)
        tokenizer = summaries[0]["tokenizer"]
        data_vocab = _tokenizer(tokenizer, job.data.prefixes[0]).vocab_size
    packed = int(summaries[0]["seq_length"]) if summaries else None
    if job.model.seq_length is not None and packed is not None and job.model.seq_length != packed:
        raise ConfigError(
            f"model.seq_length={job.model.seq_length} differs from the data's packed length {packed} "
            f"({job.data.prefixes[0]}.pack.json): pack again or drop the override"
        )
    seq_length = job.model.seq_length or packed or preset.seq_length
    vocab = job.model.vocab_size or data_vocab or preset.vocab_size
    if data_vocab is not None and vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary {data_vocab}")
    validate_world(job, world_size, seq_length)
    return ResolvedJob(
        job, world_size, preset.replace(seq_length=seq_length, vocab_size=vocab), tokenizer, summaries
    )
