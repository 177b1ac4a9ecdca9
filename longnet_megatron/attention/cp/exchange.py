"""Point-to-point message exchange inside the CP group, asynchronous, with a byte count.

LongNet's distributed algorithm gathers dilated keys among the ranks that share a segment and
reduce-scatters their gradients back. With contiguous chunks, the ranks sharing a segment are a
run of consecutive CP ranks that differs per pattern (and, for segments that are not a multiple of
the chunk, overlaps the next run). Sending each message straight to the member that reads it does
both collectives with the bytes of a ring (every rank sends its part once to each reader, exactly
sized, so ragged parts need no padding) and uses the CP group's own communicator: no sub-groups to
create in the same order on every rank of the world, which tensor- and pipeline-parallel layouts make
awkward. ``batch_isend_irecv`` coalesces the messages into one NCCL group call.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_READY_GROUPS: weakref.WeakSet[dist.ProcessGroup] = weakref.WeakSet()


@dataclass
class PendingExchange:
    """Messages in flight; :meth:`wait` returns the receive buffers in the order they were given."""

    works: list[dist.Work]
    received: list[torch.Tensor]
    sent: list[torch.Tensor] = field(default_factory=list)  # kept alive until the sends complete

    def wait(self) -> list[torch.Tensor]:
        """Block until every message of the exchange has arrived (and every send has left)."""
        for work in self.works:
            work.wait()
        self.works, self.sent = [], []
        return self.received


def ensure_communicator(group: dist.ProcessGroup, device: torch.device) -> None:
    """Run one collective on ``group`` before its first point-to-point call; call it on EVERY rank.

    NCCL requires every rank of a group to take part in the group's first call, and point-to-point
    calls involve only some ranks; a one-time all-reduce creates the communicator on all of them.
    """
    if group not in _READY_GROUPS:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _READY_GROUPS.add(group)


def start_exchange(
    sends: Sequence[tuple[int, torch.Tensor, int]],
    receives: Sequence[tuple[int, torch.Tensor, int]],
    group: dist.ProcessGroup,
) -> PendingExchange:
    """Post ``(peer, tensor, tag)`` sends and receives (peers are ranks in ``group``); do not wait.

    Both sides must post a message with the same tag and size; tags keep several messages between
    one pair of ranks apart on backends that match by tag (gloo). Empty tensors are skipped on both
    sides, so callers may pass them. :func:`ensure_communicator` must have run on the group.
    """
    ops = []
    for op, items in ((dist.isend, sends), (dist.irecv, receives)):
        for peer, tensor, tag in items:
            if tensor.numel():
                ops.append(dist.P2POp(op, tensor, dist.get_global_rank(group, peer), group, tag))
    if not ops:
        return PendingExchange([], [t for _, t, _ in receives])
    works = dist.batch_isend_irecv(ops)
    return PendingExchange(list(works), [t for _, t, _ in receives], [t for _, t, _ in sends])
