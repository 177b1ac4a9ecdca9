"""Checkpoint saves that write their shards in the background (``checkpoint.async_save``).

Megatron's dist-checkpoint async save: ``dist_checkpointing.save(..., async_sharded_save=True)`` writes
``common.pt`` and plans the shards, then returns an ``AsyncRequest`` that Megatron's ``AsyncCallsQueue``
runs in a forked process (which forks one writer per file bucket; GPU tensors are first copied to host
memory, so training may change them at once). Finalization is collective and runs on every rank once
every rank's writer has finished: Megatron's own steps (the ``.metadata`` index, ``metadata.json``),
then the commit that :func:`~.weights.save_dist_checkpoint` attaches (``longnet.json``, the rename of
``iter_N.tmp`` to ``iter_N``, ``latest``). So ``latest`` never names a checkpoint some rank has not
finished; a failed write leaves the previous ``latest`` and raises a one-line ``unwritable``
:class:`CheckpointError` on every rank at the next :meth:`AsyncSaves.finalize`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException

from longnet_megatron.checkpoint.errors import CheckpointError, describe_error


@dataclass(frozen=True)
class PendingSave:
    """A save whose shards are being written: ``tmp`` becomes ``final`` when it is committed."""

    final: Path
    tmp: Path


class AsyncSaves:
    """The saves of one run in flight, oldest first (every method is collective: call it on all ranks)."""

    def __init__(self) -> None:
        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: list[PendingSave] = []

    @property
    def pending(self) -> list[PendingSave]:
        """Saves scheduled and not yet committed."""
        return list(self._pending)

    def schedule(self, request: AsyncRequest, save: PendingSave) -> None:
        """Start writing ``request``'s shards in the background; it commits ``save`` when finalized."""
        self._queue.schedule_async_request(request)
        self._pending.append(save)

    def finalize(self, blocking: bool) -> list[Path]:
        """Commit the saves every rank has finished writing (``blocking``: wait for all of them).

        Returns the committed checkpoints. A save that failed on any rank is removed and raises a
        one-line ``unwritable`` :class:`CheckpointError` on every rank; the earlier ``latest`` stays.
        """
        if not self._pending:
            return []
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # a BaseException: the writers' failures
            failed = self._pending.pop(0)
            if dist.get_rank() == 0:
                shutil.rmtree(failed.tmp, ignore_errors=True)
            if isinstance(e, CheckpointError):  # the commit's own one-line error
                raise
            raise CheckpointError(
                f"saving {failed.final} in the background failed: {describe_error(e)}; "
                f"{failed.final.name} was not written and `latest` still names the checkpoint before it",
                "unwritable",
            ) from e
        committed, self._pending = self._pending[: len(done)], self._pending[len(done) :]
        return [save.final for save in committed]

    def close(self) -> list[Path]:
        """Wait for every save in flight (before the process exits)."""
        return self.finalize(blocking=True)
