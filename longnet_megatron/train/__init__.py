"""LongNet pretraining on Megatron-Core: config, distributed setup, data, model, optimizer, checkpoints,
metrics, signals and the Trainer (docs/training.md). Import submodules directly; this package
imports nothing heavy so that ``longnet-train --check`` stays fast."""
