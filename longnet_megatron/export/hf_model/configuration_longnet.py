"""transformers configuration of an exported LongNet model (copied into every export folder).

The keys are those of ``longnet_megatron.export.plain.LongNetArgs``; this class only lets
transformers carry them (``AutoConfig.from_pretrained(folder, trust_remote_code=True)``).
"""

from transformers import PretrainedConfig


class LongNetHFConfig(PretrainedConfig):
    """LongNet GPT: Megatron-trained, dilated attention. See ``config.json`` for the fields."""

    model_type = "longnet"

    def __init__(self, tie_word_embeddings: bool = True, use_cache: bool = True, **kwargs):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after: transformers 5 takes use_cache for a generation option and drops the kwarg.
        self.use_cache = use_cache  # forward's default: the bounded dilated cache (LongNetHFCache)
