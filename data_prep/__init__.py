"""longnet-prep: raw corpora to tokenized and packed Megatron datasets (see docs/data.md).

Kept free of heavy imports: worker processes import this package, and megatron (with torch, seconds
to import) is loaded only inside the functions that read or write datasets.
"""
