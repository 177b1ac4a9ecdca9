"""transformers model of an exported LongNet (copied into every export folder, loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``).

transformers copies this file into its module cache and imports it from there, so the network is not
defined here: it comes from the installed ``longnet_megatron`` package (``pip install
longnet-megatron``), the same modules as ``LongNetForCausalLM.from_pretrained(folder)`` and the same
dilated attention kernels as training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from longnet_megatron.export import plain

from .configuration_longnet import LongNetHFConfig


def _tied_keys():
    # transformers 5 maps tied parameter -> source; 4.x lists the tied names.
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return ["lm_head.weight"]


class LongNetHFForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM wrapper: ``model`` and ``lm_head`` are ``longnet_megatron.export.plain``'s modules.

    Limits: no KV cache (each generation step runs the whole prefix through dilated attention), and
    no padding mask (batches of unequal prompts must be run one by one).
    """

    config_class = LongNetHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["LongNetBlock"]
    _tied_weights_keys = _tied_keys()
    _supports_cache_class = False
    supports_gradient_checkpointing = False

    def __init__(self, config: LongNetHFConfig):
        super().__init__(config)
        inner = plain.LongNetForCausalLM(plain.LongNetArgs.from_dict(config.to_dict()))
        self.model = inner.model
        self.lm_head = inner.lm_head
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _init_weights(self, module):
        # Weights always come from the checkpoint; nothing to initialise.
        pass

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LongNet's dilated attention has no padding mask: pass unpadded sequences")
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step sees the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
