"""Layer specs for LongNet: Megatron's GPT layer specs with the dilated core attention swapped in.

Everything but the core attention (fused layernorm + QKV projection, output projection, MLP, bias-
dropout-add) is exactly what Megatron's own ``get_gpt_layer_with_transformer_engine_spec`` /
``get_gpt_layer_local_spec`` build; only ``self_attention.submodules.core_attention`` changes.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec

from longnet_megatron.model.core_attention import DilatedCoreAttention


def transformer_engine_available() -> bool:
    """Whether Megatron found a usable Transformer Engine (its own import check)."""
    return gpt_layer_specs.HAVE_TE


def with_dilated_core_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a GPT layer spec whose self-attention uses :class:`DilatedCoreAttention`."""
    attention = layer_spec.submodules.self_attention
    attention_submodules = dataclasses.replace(
        attention.submodules, core_attention=ModuleSpec(module=DilatedCoreAttention)
    )
    return dataclasses.replace(
        layer_spec,
        submodules=dataclasses.replace(
            layer_spec.submodules,
            self_attention=dataclasses.replace(attention, submodules=attention_submodules),
        ),
    )


def get_longnet_layer_spec(
    use_te: bool | None = None, *, qk_layernorm: bool = False, normalization: str = "LayerNorm"
) -> ModuleSpec:
    """The LongNet transformer layer spec.

    use_te: True for Transformer Engine layers (TELayerNormColumnParallelLinear, TERowParallelLinear,
            ...), False for Megatron's local layers, None to use TE whenever it imports.
    normalization: "LayerNorm" or "RMSNorm" (the TE layers take it from the config instead).
    """
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        if not transformer_engine_available():
            raise ImportError("use_te=True but Transformer Engine is not importable")
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        base = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=qk_layernorm, normalization=normalization
        )
    return with_dilated_core_attention(base)
