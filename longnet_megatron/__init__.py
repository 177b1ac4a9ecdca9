"""longnet-megatron: LongNet (dilated attention) transformers pretrained on Megatron-Core."""

__version__ = "0.1.0"
