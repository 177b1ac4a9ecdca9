"""Move full (unsharded) LongNet GPT weights between layouts: TP shards, PP stages, local vs TE names.

Megatron's tensor-parallel layers shard a weight along one dimension, contiguously by rank:

* column-parallel (``linear_qkv``, ``linear_fc1``, the vocab-parallel embedding and output layer): the
  output rows, dim 0, weight and bias. ``linear_qkv``'s rows are already grouped per kv group
  (``[q_1..q_g, k, v]`` for each group), so a contiguous split hands each rank whole groups (or, with
  fewer groups than ranks, a slice Megatron re-gathers in forward);
* row-parallel (``linear_proj``, ``linear_fc2``): the input columns, dim 1; the bias is replicated;
* everything else (norms) is replicated.

Gated MLPs (SwiGLU) keep ``[gate; up]`` per rank, so ``linear_fc1`` is split per half.
"""

from __future__ import annotations

import torch

_COLUMN_PARALLEL = (
    "word_embeddings.weight",
    "output_layer.weight",
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
)
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")

StateDict = dict[str, torch.Tensor]


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension along which parameter ``name`` is split over tensor-parallel ranks (None: replicated)."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def _is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def tensors_only(state: dict) -> StateDict:
    """Drop Megatron's ``_extra_state`` entries (TE/FP8 metadata, not weights)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def shard_for_tensor_parallel(
    full: StateDict, tp_rank: int, tp_size: int, *, gated_linear_unit: bool = False
) -> StateDict:
    """Tensor-parallel rank ``tp_rank``'s shard of the unsharded state dict ``full``."""
    shards = {}
    for name, tensor in tensors_only(full).items():
        dim = tensor_parallel_dim(name)
        if dim is None:
            shards[name] = tensor.clone()
        elif _is_gated_fc1(name, gated_linear_unit):
            halves = [h.chunk(tp_size, dim=0)[tp_rank] for h in tensor.chunk(2, dim=0)]
            shards[name] = torch.cat(halves, dim=0).clone()
        else:
            if tensor.shape[dim] % tp_size:
                raise ValueError(f"{name}: dim {dim} of {tuple(tensor.shape)} does not split into {tp_size}")
            shards[name] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return shards


def merge_tensor_parallel_shards(shards: list[StateDict], *, gated_linear_unit: bool = False) -> StateDict:
    """Inverse of :func:`shard_for_tensor_parallel`: the unsharded state dict (replicas from rank 0)."""
    full = {}
    for name in tensors_only(shards[0]):
        parts = [s[name] for s in shards]
        dim = tensor_parallel_dim(name)
        if dim is None:
            full[name] = parts[0]
        elif _is_gated_fc1(name, gated_linear_unit):
            halves = [p.chunk(2, dim=0) for p in parts]
            full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            full[name] = torch.cat(parts, dim=dim)
    return full


def pipeline_stage_layer_numbers(model: torch.nn.Module) -> list[int]:
    """Global 0-based indices of the transformer layers this (pipeline/virtual) stage holds, in order."""
    return [layer.layer_number - 1 for layer in model.decoder.layers]


def select_pipeline_stage(full: StateDict, model: torch.nn.Module) -> StateDict:
    """The entries of an unsharded-by-PP state dict that a pipeline stage ``model`` holds, renamed.

    Layer ``decoder.layers.{g}`` of the full model is ``decoder.layers.{l}`` of the stage holding it.
    """
    rename = {
        f"decoder.layers.{g}.": f"decoder.layers.{i}."
        for i, g in enumerate(pipeline_stage_layer_numbers(model))
    }
    wanted = set(tensors_only(model.state_dict()))
    stage = {}
    for name, tensor in full.items():
        local = name
        if name.startswith("decoder.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in rename:
                continue
            local = rename[prefix] + name[len(prefix) :]
        if local in wanted:
            stage[local] = tensor
    return stage


def globalize_layer_names(stage_state: StateDict, model: torch.nn.Module) -> StateDict:
    """Inverse of :func:`select_pipeline_stage`'s renaming: stage-local layer indices to global ones."""
    rename = {
        f"decoder.layers.{i}.": f"decoder.layers.{g}."
        for i, g in enumerate(pipeline_stage_layer_numbers(model))
    }
    out = {}
    for name, tensor in stage_state.items():
        prefix = ".".join(name.split(".")[:3]) + "."
        out[rename[prefix] + name[len(prefix) :] if prefix in rename else name] = tensor
    return out


def local_to_te_names() -> dict[str, str]:
    """Name prefixes of the local spec's separate norms -> TE's layernorm fused into the next linear.

    Read from Megatron's local layer spec (its ``sharded_state_dict_keys_map`` exists for exactly this
    correspondence), e.g. ``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map)


def rename_local_to_te(state: StateDict) -> StateDict:
    """A local-spec state dict with TE-spec parameter names (``_extra_state`` dropped)."""
    mapping = local_to_te_names()
    out = {}
    for name, tensor in tensors_only(state).items():
        for local, te in mapping.items():
            marker = "." + local
            if marker in name:
                name = name.replace(marker, "." + te)
                break
        out[name] = tensor
    return out
