"""Loading a checkpoint runs none of its files' code: crafted pickles are refused before they run."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.checkpoint.verify import read_common, read_dcp_metadata, safe_loading, verify_checkpoint


class _Payload:
    """Pickles to a call of ``os.system``: what an attacker would put into a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_dir(root: Path) -> Path:
    """A directory that passes every check before .metadata (metadata.json, common.pt)."""
    ckpt = root / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"world_size": 1}, ckpt / "common.pt")
    return ckpt


def test_crafted_metadata_pickle_is_refused_before_it_runs(tmp_path):
    ckpt = _checkpoint_dir(tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt)
    assert err.value.kind == "unsafe" and "posix.system" in str(err.value) and ".metadata" in str(err.value)
    # torch's own reader, as Megatron's loaders call it, goes through the same allow-list.
    with pytest.raises(CheckpointError, match="not a torch checkpoint metadata class"), safe_loading():
        FileSystemReader(str(ckpt)).read_metadata()
    assert not marker.exists()
    # Outside the block torch's reader is the standard one again (the patch does not leak).
    from torch.distributed.checkpoint import filesystem

    assert filesystem.pickle is pickle


def test_crafted_common_state_is_refused(tmp_path):
    ckpt = _checkpoint_dir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Payload(marker)}, ckpt / "common.pt")
    with pytest.raises(CheckpointError) as err:
        read_common(ckpt)
    assert err.value.kind == "unsafe" and "common.pt" in str(err.value)
    assert not marker.exists()


def test_every_torch_load_is_weights_only_inside_safe_loading(tmp_path):
    """Shard byte items are read by torch with weights_only=False; inside the block that is overridden."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    with pytest.raises(CheckpointError) as err, safe_loading():
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert err.value.kind == "unsafe"
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_real_checkpoints_metadata_passes_the_allow_list(tmp_path, real_checkpoint):
    """Every global a real Megatron checkpoint's .metadata names is allowed (trainer and converter)."""
    target = tmp_path / "copy"
    shutil.copytree(real_checkpoint, target)
    metadata = read_dcp_metadata(target)
    assert metadata.state_dict_metadata
    verify_checkpoint(target)
