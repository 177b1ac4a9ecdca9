"""Where the Megatron-Core versions this project runs on (0.16.1 .. 0.19.x) differ in an API it calls.

Kept in one place so that a new release means one file to read. What differs and what is done:

* ``dist_checkpointing.save(..., async_sharded_save=True)``: 0.17 added ``async_strategy`` and made
  NVIDIA Resiliency Extension's writers the default ("nvrx", a package this project does not install);
  the async saves here finalize through Megatron-Core's own ``AsyncCallsQueue``, so they ask for
  "mcore" wherever the argument exists (0.19 logs that it is deprecated; it still works).
* 0.19 stores the common (non-sharded) state as a ``common_state`` object inside the shards instead
  of ``common.pt``: :mod:`longnet_megatron.checkpoint.verify` reads either.
* 0.19 asks ``torch.cuda.current_stream()`` on every gradient sync: :mod:`.cpu` answers it on CPU.
* 0.19 builds some layer-spec submodules as ``functools.partial`` objects (new on every call), so two
  equal specs no longer compare equal; nothing here compares specs (the tests compare them by field).
"""

from __future__ import annotations

import inspect
from typing import Any

from megatron.core import dist_checkpointing


def async_save_options() -> dict[str, Any]:
    """The keywords that make ``dist_checkpointing.save`` return an AsyncCallsQueue request."""
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}
