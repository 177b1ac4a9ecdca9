"""Checkpoints: one package for the trainer, the converter and the evaluator (docs/design.md section 6).

* :mod:`.errors`, :mod:`.files`: the error type; directory names, the ``latest`` marker, atomic
  writes, finding a checkpoint (light: no Megatron import, so command-line tools start fast);
* :mod:`.verify`: completeness and safety checks before anything is loaded, resumption's fallback;
* :mod:`.record`: the one metadata record (``longnet.json``) every checkpoint carries, and its reader
  for checkpoints written before it;
* :mod:`.weights`: model weights in any parallel layout (build, check, load, save weights only);
* :mod:`.training_state`: the trainer's full state (optimizer, scheduler, RNG, data position).

The last four import Megatron-Core; import them by name.
"""

from longnet_megatron.checkpoint.errors import CheckpointError
from longnet_megatron.checkpoint.files import (
    CHECKPOINTS_SUBDIR,
    LATEST,
    METADATA,
    checkpoint_dirs,
    checkpoint_name,
    find_checkpoint,
    write_atomic,
)

__all__ = [
    "CHECKPOINTS_SUBDIR",
    "LATEST",
    "METADATA",
    "CheckpointError",
    "checkpoint_dirs",
    "checkpoint_name",
    "find_checkpoint",
    "write_atomic",
]
