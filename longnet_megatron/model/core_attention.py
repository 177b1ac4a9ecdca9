"""DilatedCoreAttention: LongNet's dilated attention as Megatron-Core's ``core_attention`` submodule.

Megatron's SelfAttention projects q, k, v (column-parallel, so each tensor-parallel rank holds a
contiguous block of heads), applies RoPE, and calls ``core_attention(q, k, v, mask)`` with tensors in
``[s, b, heads, head_dim]``; it expects ``[s, b, heads * head_dim]`` back for the row-parallel output
projection. This module is that call, with dilated attention instead of dense attention. It only has
to know where its heads and tokens sit globally:

* head offset: local query head 0 is global head ``tp_rank * heads_per_rank`` (this also holds when
  there are fewer kv groups than tp ranks: Megatron then replicates kv heads and still gives rank r
  query heads ``[r * heads_per_rank, (r + 1) * heads_per_rank)``);
* position offset: under context parallelism each rank holds the contiguous chunk
  ``[cp_rank * s, (cp_rank + 1) * s)`` of the sequence, and the CP group is passed on so that
  patterns longer than a chunk run LongNet's distributed algorithm.

Document masking arrives as Megatron's ``packed_seq_params``: a
:class:`~longnet_megatron.model.documents.DocumentMask` carrying the batch's documents.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from longnet_megatron.attention import dilated_attention
from longnet_megatron.model.config import LongNetConfig
from longnet_megatron.model.documents import DocumentMask

_CAUSALITY = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}


class DilatedCoreAttention(MegatronModule):
    """Megatron-Core 0.16 core attention computing exact LongNet dilated attention.

    The constructor takes exactly what Megatron's Attention passes to ``core_attention`` (and the
    ``attention_dropout`` of DotProductAttention). ``config`` must be a :class:`LongNetConfig`; the
    layer's patterns come from ``config.dilated_config_for_layer(layer_number)``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if not isinstance(config, LongNetConfig):
            raise TypeError(
                f"DilatedCoreAttention needs a LongNetConfig (it carries the dilated patterns), "
                f"got {type(config).__name__}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout} is not supported by dilated attention; use 0.0")
        if attn_mask_type not in _CAUSALITY:
            raise ValueError(
                f"attn_mask_type={attn_mask_type} is not supported: dilated attention is causal or unmasked"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by dilated attention")
        if config.window_size is not None:
            raise ValueError("window_size (sliding-window attention) does not combine with dilated attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type  # Megatron's ring/a2a choice; LongNet CP has its own algorithm.
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)

        tp_size = self.tp_group.size()
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.head_offset = self.tp_group.rank() * self.num_heads_per_partition
        # apply_query_key_layer_scaling only changes where fp16 scaling happens (the product stays
        # softmax_scale), so the scale Megatron means is softmax_scale or 1/sqrt(head_dim).
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dilated_config = dataclasses.replace(
            config.dilated_config_for_layer(self.layer_number),
            causal=_CAUSALITY[attn_mask_type],
            softmax_scale=scale,
        )
        self.backend = config.attention_backend_name

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """q ``[s, b, hq, d]``, k and v ``[s, b, hkv, d]`` -> ``[s, b, hq * d]``.

        ``attention_mask`` is ignored: causality comes from the mask type, which is how Megatron's
        causal GPT passes it (the mask tensor then only restates the causal triangle). A
        :class:`DocumentMask` as ``packed_seq_params`` masks attention across its documents.
        """
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by dilated attention")
        if packed_seq_params is not None and not isinstance(packed_seq_params, DocumentMask):
            raise NotImplementedError(
                "packed sequences (THD) are not supported by dilated attention; pass documents as a "
                "longnet_megatron.model.documents.DocumentMask"
            )
        documents = packed_seq_params.documents if packed_seq_params is not None else None
        if attn_mask_type is not None and attn_mask_type != self.attn_mask_type:
            raise ValueError(
                f"attn_mask_type={attn_mask_type} differs from the layer's {self.attn_mask_type}"
            )
        seq_local = query.shape[0]
        cp_group, position_offset = None, 0
        if self.cp_group is not None and self.cp_group.size() > 1:
            cp_group, position_offset = self.cp_group, self.cp_group.rank() * seq_local
        out = dilated_attention(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            self.dilated_config,
            head_offset=self.head_offset,
            position_offset=position_offset,
            backend=self.backend,
            cp_group=cp_group,
            document_ids=documents,
        )
        # [b, s, h, d] -> [s, b, h * d]
        return out.transpose(0, 1).reshape(seq_local, out.shape[0], -1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_number}, patterns={self.dilated_config.patterns}, "
            f"causal={self.dilated_config.causal}, head_offset={self.head_offset}, backend={self.backend!r}"
        )
