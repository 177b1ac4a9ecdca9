"""Megatron's MLP run over the sequence in chunks, each under an activation checkpoint.

The MLP is token-wise, so running it on ``[chunk, b, h]`` slices of the ``[s, b, h]`` input and
concatenating the outputs is the same function. What changes is what backward keeps: the MLP's largest
activations, fc1's output and the GeLU's output (``4 f`` bytes a token at 2-byte activations), are not
saved; each chunk's are rebuilt from its input during backward (one extra MLP forward), so at most one
chunk's are alive at a time. At 1M tokens with f = 8192 that is 2 GiB instead of 32 GiB.

Under sequence parallelism the chunks are of the rank's local shard; fc1 gathers the same chunk of
every rank and fc2 scatters it back, which is still token-wise. Under FP8 the checkpoint would replay TE's
amax bookkeeping, so the configuration refuses the combination (``model.mlp_chunk_tokens`` with
``model.fp8``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

# Megatron's TransformerLayer logs this for every MLP module other than exactly MLP (it then passes no
# tp_group, which ChunkedMLP gets from its spec instead: specs.with_chunked_mlp).
_LAYER_LOGGER = "megatron.core.transformer.transformer_layer"
_UNKNOWN_MLP = "Unknown MLP type"


class _DropUnknownMLPNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_UNKNOWN_MLP)


@contextlib.contextmanager
def quiet_chunked_mlp_notice() -> Iterator[None]:
    """While a model is built: drop Megatron's per-layer "Unknown MLP type" notice about ChunkedMLP."""
    logger, notice_filter = logging.getLogger(_LAYER_LOGGER), _DropUnknownMLPNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


class ChunkedMLP(MLP):
    """:class:`megatron.core.transformer.mlp.MLP` over ``chunk_tokens``-token slices of the sequence.

    Same parameters, state dict and outputs as the MLP; a sequence no longer than ``chunk_tokens`` (and an
    expert's ``per_token_scale`` call) runs the MLP unchanged. With gradients on, each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant, so it nests inside Megatron's full-layer recompute); without
    them (the no-grad pass of a recomputed layer, evaluation) the chunks only bound the forward's peak.
    """

    def __init__(
        self, config: TransformerConfig, submodules: MLPSubmodules, chunk_tokens: int, **kwargs
    ) -> None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer")
        super().__init__(config, submodules, **kwargs)
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """``(output, output_bias)`` as :meth:`MLP.forward`, computed chunk by chunk along dim 0."""
        if per_token_scale is not None or hidden_states.shape[0] <= self.chunk_tokens:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        parent = super().forward
        outputs, bias = [], None
        for chunk in torch.split(hidden_states, self.chunk_tokens, dim=0):
            if torch.is_grad_enabled():
                output, bias = checkpoint(parent, chunk, use_reentrant=False, **kwargs)
            else:
                output, bias = parent(chunk, **kwargs)
            outputs.append(output)
        # fc2 skips its bias add (the layer's bias-dropout-add adds it): every chunk returns the same
        # bias parameter, returned once as the unchunked MLP does.
        return torch.cat(outputs, dim=0), bias
