"""transformers model of an exported LongNet (copied into every export folder, loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``).

transformers copies this file into its module cache and imports it from there, so the network is not
defined here: it comes from the installed ``longnet_megatron`` package (``pip install
longnet-megatron``), the same modules as ``LongNetForCausalLM.from_pretrained(folder)`` and the same
dilated attention kernels as training. So does the decode cache: :class:`LongNetHFCache` is the
plain model's bounded dilated cache on top of ``transformers.Cache``, which ``generate`` creates
(``use_cache=True``), passes as ``cache`` (``past_key_values`` is its older name) and gets back in
``outputs.cache``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from longnet_megatron.export import plain

from .configuration_longnet import LongNetHFConfig


class LongNetHFCache(plain.LongNetCache, Cache):
    """The plain model's :class:`~longnet_megatron.export.plain.LongNetCache` as a transformers ``Cache``.

    Every method transformers calls (``get_seq_length``, ``crop``, ``reorder_cache``, ...) is the plain
    cache's; ``Cache`` supplies the type generate checks for.
    """

    def __init__(self, config: LongNetHFConfig) -> None:
        plain.LongNetCache.__init__(self, plain.LongNetArgs.from_dict(config.to_dict()))
        Cache.__init__(self, layers=self.layers)


class LongNetHFForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM wrapper: ``model`` and ``lm_head`` are ``longnet_megatron.export.plain``'s modules.

    Limit: no padding mask (batches of unequal prompts must be run one by one).
    """

    config_class = LongNetHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["LongNetBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # transformers 5: tied -> source
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

    def new_cache(self) -> LongNetHFCache:
        """An empty decode cache for this model."""
        return LongNetHFCache(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: LongNetHFCache | None = None,
        past_key_values: LongNetHFCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Logits of ``input_ids``; with a cache (or ``use_cache``) they continue the cached sequence."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LongNet's dilated attention has no padding mask: pass unpadded sequences")
        cache = plain.one_cache(cache, past_key_values)
        if use_cache is None:  # the config's default, for inference only: training needs no cache
            use_cache = self.config.use_cache and not torch.is_grad_enabled()
        if cache is None and use_cache:
            cache = self.new_cache()
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        hidden = self.model(input_ids, cache)
        logits = self.lm_head(plain.keep_positions(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate's cache is this model's own (a DynamicCache has no place for dilated segments)."""
        given = model_kwargs.get("cache")
        if given is not None:
            plain.one_cache(given, None)  # a clear error for another cache type
        elif generation_config.use_cache is not False:
            if generation_config.cache_implementation is not None:
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r}: LongNet decodes "
                    "with its own dilated cache; leave cache_implementation unset"
                )
            model_kwargs["cache"] = self.new_cache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
