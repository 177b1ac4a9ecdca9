"""Checkpoint conversion and export: Megatron dist checkpoints <-> Hugging Face-style folders, layouts.

Importing this package needs only torch and ``longnet_megatron.attention``; the Megatron side
(``megatron_to_hf``, ``hf_to_megatron``, ``reshard``, which use :mod:`longnet_megatron.checkpoint`) is
imported on use.

    from longnet_megatron.export import LongNetForCausalLM, generate
    model = LongNetForCausalLM.from_pretrained("exports/tiny-hf")

Command line: ``longnet-convert {to-hf,from-hf,reshard,sample}`` (tools/convert.py); docs/export.md.
"""

from longnet_megatron.export.generate import generate, sample_text
from longnet_megatron.export.plain import LongNetArgs, LongNetForCausalLM

__all__ = ["LongNetArgs", "LongNetForCausalLM", "generate", "sample_text"]
