"""``longnet-eval``: does a trained LongNet use its context? Perplexity by position and by context,
passkey retrieval over distance, with JSON, markdown and PNG reports (docs/evaluation.md).

Layers: above ``train/`` and ``export/`` (it imports both; nothing imports it). Modules:

* :mod:`.loading`: MODEL (a run directory, a checkpoint, an exported folder) -> a scorer;
* :mod:`.scoring` (exported models, one process), :mod:`.megatron_scorer` (checkpoints, any TP / PP /
  CP layout): per-token losses without the logits tensor, logits at a few positions;
* :mod:`.perplexity`, :mod:`.passkey`: the two evaluations;
* :mod:`.report`, :mod:`.plots`: JSON, markdown tables and PNG plots;
* :mod:`.cli`: the command line.
"""
