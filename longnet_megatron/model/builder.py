"""Build Megatron-Core's GPTModel as a LongNet: the dilated layer spec, RoPE on global positions.

    config = make_longnet_config("125m")               # parallel sizes read from parallel_state
    model = build_longnet_gpt("125m", config=config, pre_process=True, post_process=True)

``build_longnet_gpt`` has the shape of Megatron-LM's ``model_provider`` (pre_process, post_process,
vp_stage), so Megatron's ``get_model``, schedules, DDP, optimizer and dist-checkpointing take it as they
take any GPTModel.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec

from longnet_megatron.model.chunked_mlp import quiet_chunked_mlp_notice
from longnet_megatron.model.config import LongNetConfig, PerLayerPatterns
from longnet_megatron.model.gpt_model import LongNetGPTModel
from longnet_megatron.model.presets import LongNetPreset, get_preset
from longnet_megatron.model.rope import ContiguousCPRotaryEmbedding
from longnet_megatron.model.specs import get_longnet_layer_spec, with_chunked_mlp


def _parallel_sizes() -> dict[str, Any]:
    """Model-parallel sizes from Megatron's parallel_state (all 1 before it is initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return {}
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
    }


def make_longnet_config(
    preset: str | LongNetPreset,
    *,
    dilated_attention_per_layer: PerLayerPatterns | None = None,
    attention_backend_name: str = "auto",
    **overrides: Any,
) -> LongNetConfig:
    """The LongNetConfig of a preset; ``overrides`` set any TransformerConfig field.

    Defaults: GPT-3 style (LayerNorm, GeLU, biases), no dropout (dilated attention has no attention-
    probability dropout; hidden dropout is off for reproducibility and is an override away), fp32
    parameters (``bf16=True`` switches params and pipeline dtypes to bf16), CPU initialisation when
    CUDA is absent, and tensor/pipeline/virtual/context parallel sizes read from parallel_state.
    """
    preset = get_preset(preset)
    bf16 = bool(overrides.get("bf16", False))
    dtype = overrides.get("params_dtype", torch.bfloat16 if bf16 else torch.float32)
    fields: dict[str, Any] = {
        "num_layers": preset.num_layers,
        "hidden_size": preset.hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_query_groups": preset.num_query_groups,
        "ffn_hidden_size": preset.ffn_hidden_size,
        "init_method_std": preset.init_method_std,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "normalization": "LayerNorm",
        "add_bias_linear": True,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "use_cpu_initialization": not torch.cuda.is_available(),
        "dilated_attention": preset.dilated_attention,
        "dilated_attention_per_layer": dilated_attention_per_layer,
        "attention_backend_name": attention_backend_name,
        # Megatron-Core 0.16 defaults to "full", the deprecated spelling of "the whole layer" (and warns).
        "cuda_graph_scope": [],
        **_parallel_sizes(),
    }
    fields.update(overrides)
    if fields["num_query_groups"] is None:
        del fields["num_query_groups"]
    if fields["ffn_hidden_size"] is None:
        del fields["ffn_hidden_size"]
    return LongNetConfig(**fields)


def build_longnet_gpt(
    preset: str | LongNetPreset,
    *,
    config: LongNetConfig | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_te: bool | None = None,
    parallel_output: bool = True,
    pg_collection: ProcessGroupCollection | None = None,
    layer_spec: ModuleSpec | None = None,
    **config_overrides: Any,
) -> GPTModel:
    """Megatron's GPTModel with LongNet's layer spec and RoPE on global (contiguous-CP) positions.

    preset: a name from ``PRESETS`` or a :class:`LongNetPreset` (vocabulary, sequence length, tying,
        RoPE base come from it).
    config: a ready LongNetConfig; default ``make_longnet_config(preset, **config_overrides)``.
    pre_process / post_process / vp_stage: this pipeline stage's part, as Megatron's model providers.
    use_te: Transformer Engine layers (None: when TE imports). See :func:`get_longnet_layer_spec`.
    layer_spec: another transformer layer spec (e.g. Megatron's dense one, for baselines); ``use_te`` is
        then unused. Either spec's MLP runs in chunks when ``config.mlp_chunk_tokens`` is set.
    The model is a :class:`LongNetGPTModel` (GPTModel plus the chunked loss of ``loss_chunk_tokens``).
    """
    preset = get_preset(preset)
    if config is None:
        config = make_longnet_config(preset, **config_overrides)
    elif config_overrides:
        raise ValueError("pass config overrides or a ready config, not both")
    if layer_spec is None:
        layer_spec = get_longnet_layer_spec(use_te, normalization=config.normalization)
    if config.mlp_chunk_tokens:
        tp_group = pg_collection.tp if pg_collection is not None else None
        layer_spec = with_chunked_mlp(layer_spec, config.mlp_chunk_tokens, tp_group)
    with quiet_chunked_mlp_notice():
        model = LongNetGPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=preset.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=preset.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=preset.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=preset.rotary_base,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
    # Same angles as Megatron's RotaryEmbedding, sliced by LongNet's contiguous CP split.
    model.rotary_pos_emb = ContiguousCPRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=preset.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
        cp_group=model.pg_collection.cp,
    )
    return model
