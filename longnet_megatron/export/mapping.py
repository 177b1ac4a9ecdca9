"""Megatron GPTModel names and layouts <-> the exported (Hugging Face style) names. Pure tensor code.

The Megatron side is the unsharded state dict of a TP=1, PP=1 model with Megatron's local layer spec
(``decoder.layers.{i}.self_attention.linear_qkv.weight``, ...). Two layouts change on the way:

* ``linear_qkv`` stacks its output rows per query group, ``[q_1 .. q_g, k, v]`` for each of the
  ``num_query_groups`` groups (head_dim rows each), so query head ``j * g + i`` reads kv head ``j``,
  the grouped-query convention of the dilated attention. It becomes q_proj, k_proj, v_proj.
* a gated ``linear_fc1`` is ``[gate; up]``: it becomes gate_proj and up_proj.
"""

from __future__ import annotations

import re

import torch

from longnet_megatron.export.plain import LongNetArgs

StateDict = dict[str, torch.Tensor]

# Megatron (local spec, global layer index) suffix -> exported suffix, inside one layer.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def _qkv_split(t: torch.Tensor, args: LongNetArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = args.num_key_value_heads
    per_group = args.num_attention_heads // groups
    rows = t.view(groups, per_group + 2, args.head_dim, *t.shape[1:])
    flat = lambda x: x.reshape(-1, *t.shape[1:]).clone()  # noqa: E731
    return flat(rows[:, :per_group]), flat(rows[:, per_group]), flat(rows[:, per_group + 1])


def _qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LongNetArgs) -> torch.Tensor:
    groups = args.num_key_value_heads
    per_group = args.num_attention_heads // groups
    tail = q.shape[1:]
    parts = (
        q.view(groups, per_group, args.head_dim, *tail),
        k.view(groups, 1, args.head_dim, *tail),
        v.view(groups, 1, args.head_dim, *tail),
    )
    return torch.cat(parts, dim=1).reshape(-1, *tail).contiguous()


def megatron_to_hf_state(megatron: StateDict, args: LongNetArgs) -> StateDict:
    """Exported state dict of a full Megatron state dict (``_extra_state`` entries ignored).

    A tied output layer is not written (``lm_head.weight`` is the embedding); every Megatron tensor
    must find a place, so a stray name is an error rather than a silently dropped weight.
    """
    out: StateDict = {}
    leftovers = []
    for name, tensor in megatron.items():
        if name.endswith("_extra_state") or not isinstance(tensor, torch.Tensor):
            continue
        match = _LAYER.fullmatch(name)
        if name in _GLOBAL_RENAMES:
            if name == "output_layer.weight" and args.tie_word_embeddings:
                continue
            out[_GLOBAL_RENAMES[name]] = tensor.clone()
        elif match is None:
            leftovers.append(name)
        else:
            prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
            kind = rest.rsplit(".", 1)[-1]
            if rest in _LAYER_RENAMES:
                out[prefix + _LAYER_RENAMES[rest]] = tensor.clone()
            elif rest.startswith("self_attention.linear_qkv."):
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), _qkv_split(tensor, args)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part
            elif rest.startswith("mlp.linear_fc1."):
                if args.gated_mlp:
                    gate, up = tensor.chunk(2, dim=0)
                    out[f"{prefix}mlp.gate_proj.{kind}"] = gate.clone()
                    out[f"{prefix}mlp.up_proj.{kind}"] = up.clone()
                else:
                    out[f"{prefix}mlp.up_proj.{kind}"] = tensor.clone()
            else:
                leftovers.append(name)
    if leftovers:
        raise ValueError(
            f"Megatron tensors with no exported name (unsupported architecture?): {leftovers[:8]}"
        )
    return out


def hf_to_megatron_state(hf: StateDict, args: LongNetArgs) -> StateDict:
    """Inverse of :func:`megatron_to_hf_state`: the full Megatron (local spec) state dict."""
    inverse_global = {v: k for k, v in _GLOBAL_RENAMES.items()}
    inverse_layer = {v: k for k, v in _LAYER_RENAMES.items()}
    hf = dict(hf)
    out: StateDict = {}
    if args.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    for i in range(args.num_hidden_layers):
        prefix, target = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            q = hf.pop(f"{prefix}self_attn.q_proj.{kind}", None)
            if q is not None:
                k, v = hf.pop(f"{prefix}self_attn.k_proj.{kind}"), hf.pop(f"{prefix}self_attn.v_proj.{kind}")
                out[f"{target}self_attention.linear_qkv.{kind}"] = _qkv_merge(q, k, v, args)
            up = hf.pop(f"{prefix}mlp.up_proj.{kind}", None)
            if up is not None:
                gate = hf.pop(f"{prefix}mlp.gate_proj.{kind}", None) if args.gated_mlp else None
                out[f"{target}mlp.linear_fc1.{kind}"] = (
                    torch.cat([gate, up], dim=0) if gate is not None else up.clone()
                )
        for name in [n for n in hf if n.startswith(prefix)]:
            rest = name[len(prefix) :]
            if rest in inverse_layer:
                out[target + inverse_layer[rest]] = hf.pop(name).clone()
    for name in [n for n in hf if n in inverse_global]:
        out[inverse_global[name]] = hf.pop(name).clone()
    if hf:
        raise ValueError(f"exported tensors with no Megatron name: {sorted(hf)[:8]}")
    return out
