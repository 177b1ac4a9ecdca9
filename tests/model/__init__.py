"""Tests of the LongNet model on Megatron-Core (TP, PP, specs, presets, CPU shim)."""
