"""Document masking for the LongNet GPTModel: a packed batch's documents ride Megatron's packed_seq_params.

Megatron's GPTModel hands ``packed_seq_params`` unchanged through TransformerBlock, every
TransformerLayer and SelfAttention (recomputation included) to ``core_attention`` on every pipeline
stage. :class:`DocumentMask` is a PackedSeqParams in the ordinary ``sbhd`` layout (so Megatron's THD
code paths stay off) that also carries the batch's :class:`~longnet_megatron.attention.documents.Documents`
for :class:`~longnet_megatron.model.core_attention.DilatedCoreAttention`, and, for
``reset_position_ids``, the positions RoPE rotates by (:class:`~longnet_megatron.model.gpt_model.LongNetGPTModel`;
Megatron's own RoPE ignores position_ids in the sbhd layout). Its ``max_seqlen_*`` are the GLOBAL
sequence length, which is what Megatron's rotary embedding reads from packed_seq_params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from longnet_megatron.attention.documents import Documents


@dataclass
class DocumentMask(PackedSeqParams):
    """PackedSeqParams of a padded-free ``[b, s]`` batch of packed documents.

    documents:        this rank's tokens' documents (the CP chunk; None: no masking).
    rope_position_ids: ``[b, s]`` positions RoPE rotates by (None: 0 .. L-1 as Megatron's GPTModel).
    """

    documents: Documents | None = None
    rope_position_ids: torch.Tensor | None = None


def document_mask(
    seq_length: int,
    document_ids: torch.Tensor | None = None,
    rope_position_ids: torch.Tensor | None = None,
) -> DocumentMask:
    """The packed_seq_params of a batch of global length ``seq_length`` (this rank's ``[b, s]`` tensors)."""
    return DocumentMask(
        qkv_format="sbhd",
        max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length,
        documents=None if document_ids is None else Documents(document_ids),
        rope_position_ids=rope_position_ids,
    )
