"""Parallel algorithms specific to LongNet (context parallelism over Megatron's CP group)."""
