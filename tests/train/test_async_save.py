"""Background checkpoint saves: committed only after every write completed; a failed write is one
line and leaves the previous checkpoint as ``latest`` (one gloo rank, Megatron's real async writers)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async

from longnet_megatron.checkpoint import CheckpointError, find_checkpoint
from longnet_megatron.checkpoint.async_save import AsyncSaves
from longnet_megatron.checkpoint.files import partial_saves
from longnet_megatron.checkpoint.weights import save_dist_checkpoint
from longnet_megatron.parallel.layout import init_single_process


def _state(value: float) -> dict:
    return {"w": ShardedTensor.from_rank_offsets("w", torch.full((64,), value)), "iteration": int(value)}


def _fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/fake/disk/__0_0.distcp")


def test_async_save_commits_after_the_write_and_a_failure_keeps_latest(tmp_path, monkeypatch):
    init_single_process()
    saves, committed = AsyncSaves(), []
    first = save_dist_checkpoint(
        _state(1.0), tmp_path, 1, {"step": 1}, overwrite=False, async_saves=saves, on_commit=committed.append
    )
    assert [p.final for p in saves.pending] == [first] and committed == []
    assert not first.exists() and (tmp_path / "iter_0000001.tmp").is_dir()  # written under its temporary name
    assert saves.finalize(blocking=True) == [first] and committed == [first]
    assert find_checkpoint(tmp_path) == first and not partial_saves(tmp_path)
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(64))}, str(first))
    assert torch.equal(loaded["w"], torch.full((64,), 1.0))

    # Writing the shard file fails with a full disk, in the background writer (a forked process: it
    # inherits the patch) where Megatron catches it and reports it to finalization.
    monkeypatch.setattr(filesystem_async, "_write_item", _fail_with_enospc)
    second = save_dist_checkpoint(_state(2.0), tmp_path, 2, {"step": 2}, overwrite=False, async_saves=saves)
    with pytest.raises(CheckpointError) as err:
        saves.finalize(blocking=True)
    message = str(err.value)
    assert err.value.kind == "unwritable" and "\n" not in message
    assert f"saving {second} in the background failed: " in message
    assert "No space left on device" in message or "OSError" in message  # 0.19 keeps only the type
    assert "`latest` still names the checkpoint before it" in message
    assert find_checkpoint(tmp_path) == first and not second.exists() and not partial_saves(tmp_path)
    assert saves.pending == [] and saves.finalize(blocking=True) == []
