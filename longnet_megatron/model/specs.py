"""Layer specs for LongNet: Megatron's GPT layer specs with the dilated core attention swapped in.

Everything but the core attention (fused layernorm + QKV projection, output projection, MLP, bias-
dropout-add) is exactly what Megatron's own ``get_gpt_layer_with_transformer_engine_spec`` /
``get_gpt_layer_local_spec`` build; only ``self_attention.submodules.core_attention`` changes, and, with
``mlp_chunk_tokens``, the MLP's module (:class:`ChunkedMLP`, same submodules).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from longnet_megatron.model.chunked_mlp import ChunkedMLP
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


def with_chunked_mlp(layer_spec: ModuleSpec, chunk_tokens: int, tp_group: Any = None) -> ModuleSpec:
    """A copy of a GPT layer spec whose MLP runs in ``chunk_tokens``-token chunks (:class:`ChunkedMLP`).

    The MLP's submodules (TE's fused LayerNorm + fc1 included) stay as they are; a spec whose MLP is
    not Megatron's dense MLP (MoE, TE's fused-op MLP) is refused rather than silently left unchunked.
    tp_group: the tensor-parallel group of a model built with its own process groups; Megatron's
    TransformerLayer hands it to an exact ``MLP`` only, so the spec carries it (None: parallel_state's,
    what the MLP defaults to).
    """
    mlp = layer_spec.submodules.mlp
    if mlp.module not in (MLP, ChunkedMLP):
        raise ValueError(f"mlp_chunk_tokens needs Megatron's dense MLP in the layer spec, not {mlp.module}")
    params = {**mlp.params, "chunk_tokens": chunk_tokens}
    if tp_group is not None:
        params["tp_group"] = tp_group
    chunked = dataclasses.replace(mlp, module=ChunkedMLP, params=params)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=chunked))


def get_longnet_layer_spec(
    use_te: bool | None = None,
    *,
    qk_layernorm: bool = False,
    normalization: str = "LayerNorm",
    mlp_chunk_tokens: int | None = None,
) -> ModuleSpec:
    """The LongNet transformer layer spec.

    use_te: True for Transformer Engine layers (TELayerNormColumnParallelLinear, TERowParallelLinear,
            ...), False for Megatron's local layers, None to use TE whenever it imports.
    normalization: "LayerNorm" or "RMSNorm" (the TE layers take it from the config instead).
    mlp_chunk_tokens: run the MLP in chunks of this many tokens (:func:`with_chunked_mlp`); None or 0: off.
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
    spec = with_dilated_core_attention(base)
    return with_chunked_mlp(spec, mlp_chunk_tokens) if mlp_chunk_tokens else spec
