"""`longnet-convert` answers bad input with one line naming the option or path, before any work.

Run in this process with click's runner on the session's exports (tests/export/conftest.py);
process spawning is made to fail, so a check that only happens after the ranks start shows up.
"""

from __future__ import annotations

import shutil

import pytest
import torch.multiprocessing
from click.testing import CliRunner

from longnet_megatron.export.cli import main as cli


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if the command starts its gloo ranks: every check must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command spawned processes before checking its arguments")

    monkeypatch.setattr(torch.multiprocessing, "spawn", refuse)


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], result.output
    return lines[0]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_reshard_rejects_a_non_positive_layout(converted, workdir, tmp_path, no_spawn, value):
    result = CliRunner().invoke(cli, ["reshard", str(workdir / "tp2"), str(tmp_path / "out"), "--tp", value])
    assert result.exit_code == 2 and "--tp" in result.output and "Traceback" not in result.output


def test_reshard_names_the_dimension_a_layout_cannot_split(converted, workdir, tmp_path, no_spawn):
    result = CliRunner().invoke(cli, ["reshard", str(workdir / "tp2"), str(tmp_path / "out"), "--tp", "3"])
    _one_line_error(result, "--tp 3 does not divide the 4 attention heads", "iter_0000007")
    result = CliRunner().invoke(cli, ["reshard", str(workdir / "tp2"), str(tmp_path / "out"), "--pp", "3"])
    _one_line_error(result, "--pp 3 does not divide the 2 layers")


def test_reshard_refuses_an_existing_output_before_starting(converted, workdir, no_spawn):
    result = CliRunner().invoke(cli, ["reshard", str(workdir / "tp2"), str(workdir / "tp2" / "checkpoints")])
    _one_line_error(result, "iter_0000007 already exists")


def test_from_hf_rejects_a_negative_iteration(converted, workdir, tmp_path):
    result = CliRunner().invoke(cli, ["from-hf", str(workdir / "hf_tp2"), str(tmp_path), "--iteration", "-3"])
    assert result.exit_code == 2 and "--iteration" in result.output
    assert not any(tmp_path.iterdir())


def test_from_hf_names_a_truncated_weights_file(converted, workdir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(workdir / "hf_tp2", folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    result = CliRunner().invoke(cli, ["from-hf", str(folder), str(tmp_path / "back")])
    _one_line_error(result, "model.safetensors")
    assert not (tmp_path / "back").exists()


def test_to_hf_keeps_an_existing_export_unless_told_to_overwrite(converted, workdir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(workdir / "hf_tp2", out)
    before = (out / "model.safetensors").read_bytes()
    result = CliRunner().invoke(cli, ["to-hf", str(workdir / "pp2"), str(out)])
    _one_line_error(result, "already holds an export", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    result = CliRunner().invoke(cli, ["to-hf", str(workdir / "pp2"), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() != before


def test_to_hf_into_an_unwritable_place_is_one_line_and_leaves_nothing(converted, workdir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(cli, ["to-hf", str(workdir / "tp2"), str(blocker / "export")])
    _one_line_error(result, "cannot write", str(blocker / "export"))
    assert blocker.read_text() == "not a directory"
