"""longnet-prep: raw corpora to tokenized and packed Megatron datasets (see docs/data.md).

Kept free of heavy imports: worker processes import this package, and megatron is loaded only by
the modules that read or write datasets.
"""
