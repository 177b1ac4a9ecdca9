"""LongNetGPTModel: Megatron's GPTModel whose training loss can skip the full logits.

With ``config.loss_chunk_tokens`` set (and labels given, outside inference) the last stage computes the
per-token loss with :func:`chunked_linear_cross_entropy` from the decoder's hidden states and the output
layer's (or the tied embedding's) weight, instead of ``output_layer`` + ``compute_language_model_loss``:
same loss ``[b, s]``, same gradients, no ``[s, b, V]`` tensor. Everything else, parameters and state-dict
keys included, is GPTModel's own; without the setting the model is GPTModel exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from longnet_megatron.model.chunked_loss import chunked_linear_cross_entropy


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
