"""FP8 training through Transformer Engine: ``model.fp8`` as TransformerConfig fields, and where it can run.

Megatron-Core runs every TE linear of a layer (fused LayerNorm + QKV, the output projection, the MLP)
inside ``fp8_autocast`` with the recipe these fields select (``megatron.core.fp8_utils.get_fp8_recipe``):
``delayed`` (DelayedScaling: scales from an amax history), ``tensorwise`` (Float8CurrentScaling: one
scale per tensor from its current amax) or ``blockwise`` (Float8BlockScaling: a scale per 1x128 / 128x128
block). The dilated core attention is not a TE module and receives bf16 q, k, v: it stays in bf16, as
do the embedding and the output layer + loss.

The configuration's own checks (TE layers, bf16, token counts) are in
:mod:`longnet_megatron.train.config.validation`; :func:`check_fp8_device` adds what needs the machine.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.utils import is_te_min_version

from longnet_megatron.model.specs import transformer_engine_available
from longnet_megatron.train.config import ConfigError, ModelConfig

# Lowest compute capability per recipe (TE: FP8 GEMMs from Ada / Hopper; block scaling from Hopper).
MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0)}
# Lowest TE version per recipe, as megatron.core.fp8_utils.get_fp8_recipe requires it.
MIN_TE_VERSION = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}


def fp8_config_fields(model: ModelConfig) -> dict[str, Any]:
    """The TransformerConfig fields of ``model.fp8`` (none when it is off)."""
    if model.fp8 is None:
        return {}
    return {
        "fp8": model.fp8_format,
        "fp8_recipe": model.fp8,
        "fp8_margin": model.fp8_margin,
        "fp8_amax_history_len": model.fp8_amax_history_len,
        "fp8_amax_compute_algo": model.fp8_amax_compute_algo,
    }


def fp8_unavailable(
    recipe: str,
    *,
    te_layers: bool,
    te_importable: bool,
    cuda: bool,
    capability: tuple[int, int] | None,
    te_version_ok: bool = True,
) -> str | None:
    """Why FP8 recipe ``recipe`` cannot run here (one clause), or None when it can."""
    if not te_layers:
        return "it needs Transformer Engine layers (model.use_te=true or null)"
    if not te_importable:
        return "Transformer Engine is not importable here"
    if not cuda:
        return "it needs a CUDA GPU (this run is on the CPU)"
    need = MIN_CAPABILITY[recipe]
    if capability is None or tuple(capability) < need:
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return (
            f"the GPU has compute capability {have}; {recipe} scaling needs {need[0]}.{need[1]} or higher "
            "(Ada, Hopper, Blackwell)"
        )
    if not te_version_ok:
        return f"{recipe} scaling needs Transformer Engine {MIN_TE_VERSION[recipe]} or newer"
    return None


def check_fp8_device(model: ModelConfig) -> None:
    """Raise a one-line :class:`ConfigError` naming ``model.fp8`` when it cannot run on this machine."""
    if model.fp8 is None:
        return
    cuda = torch.cuda.is_available()
    te = transformer_engine_available()
    reason = fp8_unavailable(
        model.fp8,
        te_layers=model.use_te is not False,  # null: TE layers whenever TE imports
        te_importable=te,
        cuda=cuda,
        capability=torch.cuda.get_device_capability() if cuda else None,
        te_version_ok=not te or is_te_min_version(MIN_TE_VERSION[model.fp8]),
    )
    if reason:
        raise ConfigError(f"model.fp8={model.fp8} cannot run: {reason}; set model.fp8=null for bf16")
