"""Compatibility shims that let Megatron-Core run where it was not written to run."""

from longnet_megatron.compat.cpu import cpu_megatron_enabled, enable_cpu_megatron

__all__ = ["cpu_megatron_enabled", "enable_cpu_megatron"]
