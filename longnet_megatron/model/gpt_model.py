"""LongNetGPTModel: Megatron's GPTModel whose training loss can skip the full logits.

With ``config.loss_chunk_tokens`` set (and labels given, outside inference) the last stage computes the
per-token loss with :func:`chunked_linear_cross_entropy` from the decoder's hidden states and the output
layer's (or the tied embedding's) weight, instead of ``output_layer`` + ``compute_language_model_loss``:
same loss ``[b, s]``, same gradients, no ``[s, b, V]`` tensor. With a
:class:`~longnet_megatron.model.documents.DocumentMask` holding ``rope_position_ids`` as
``packed_seq_params`` (``reset_position_ids``), RoPE rotates each token by that position. Everything
else, parameters and state-dict keys included, is GPTModel's own; without these the model is GPTModel
exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from longnet_megatron.model.chunked_loss import chunked_linear_cross_entropy
from longnet_megatron.model.documents import DocumentMask


class LongNetGPTModel(GPTModel):
    """GPTModel with the chunked output layer + loss of ``config.loss_chunk_tokens`` (None or 0: off)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loss_chunk_tokens and (self.mtp_process or self.config.mtp_num_layers):
            raise ValueError("loss_chunk_tokens does not support multi-token prediction (mtp_num_layers)")
        if self.loss_chunk_tokens and self.config.defer_embedding_wgrad_compute:
            raise ValueError(
                "loss_chunk_tokens computes the output weight's gradient itself: "
                "set defer_embedding_wgrad_compute=False"
            )

    @property
    def loss_chunk_tokens(self) -> int | None:
        """Tokens per chunk of the output layer + loss in training (None or 0: Megatron's plain path)."""
        return getattr(self.config, "loss_chunk_tokens", None)

    def _preprocess(self, *args: Any, **kwargs: Any) -> tuple:
        """GPTModel's, with RoPE angles at ``packed_seq_params.rope_position_ids`` when a DocumentMask has them."""
        output = super()._preprocess(*args, **kwargs)
        params = kwargs.get("packed_seq_params")
        if not isinstance(params, DocumentMask) or params.rope_position_ids is None or output[1] is None:
            return output
        if self.config.apply_rope_fusion:
            raise ValueError("per-document RoPE positions (reset_position_ids) need apply_rope_fusion=False")
        angles = self.rotary_pos_emb.at_positions(params.rope_position_ids, params.max_seqlen_q)
        return (output[0], angles, *output[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs) -> torch.Tensor:
        chunked = (
            self.loss_chunk_tokens
            and self.post_process
            and labels is not None
            and kwargs.get("inference_context") is None
        )
        if not chunked:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        layer = self.output_layer
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else layer.weight
        )
        return chunked_linear_cross_entropy(
            hidden_states,
            weight,
            labels,
            self.loss_chunk_tokens,
            bias=None if layer.skip_bias_add else layer.bias,
            tp_group=layer.tp_group,
            sequence_parallel=layer.sequence_parallel,
        )
