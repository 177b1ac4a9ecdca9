"""tools/bench_fp8.py: the loss comparison and the table (the runs themselves need an FP8 GPU)."""

from __future__ import annotations

import json

import pytest

from tests.tool_scripts import load_tool


def _rows(losses):
    return [{"step": s, "loss": loss, "tokens_per_s": 1000.0} for s, loss in losses]


def test_fp8_runs_are_compared_with_bf16_at_the_same_steps():
    tool = load_tool("bench_fp8")
    bf16 = _rows([(1, 11.0), (10, 8.0), (20, 6.0), (30, 5.0)])
    fp8 = _rows([(1, 11.0), (10, 8.2), (20, 6.1), (30, 4.9)])
    c = tool.compare(bf16, fp8, window=20)
    assert c["max_abs_diff"] == pytest.approx(0.2)
    assert c["tail_mean_abs_diff"] == pytest.approx(0.1)  # steps 20 and 30
    assert c["tail_mean_rel_diff"] == pytest.approx((0.1 / 6.0 + 0.1 / 5.0) / 2)
    assert (c["final_loss"], c["final_loss_bf16"]) == (4.9, 5.0)
    meta = {
        "device": "GPU",
        "preset": "125m",
        "seq_length": 4096,
        "steps": 30,
        "global_batch": 8,
        "data": "d",
        "window": 20,
        "command": "python tools/bench_fp8.py",
        "date": "today",
    }
    table = tool.markdown(
        {"meta": meta, "runs": {"bf16": bf16, "fp8 delayed": fp8}, "comparison": {"fp8 delayed": c}}
    )
    assert "| fp8 delayed | 11.0000 | 8.2000 | 4.9000 | 0.1000 | 1.83% | 1,000 |" in table
    with pytest.raises(SystemExit):
        tool.parse_args(["--recipes", "mxfp8"])


def test_the_training_command_is_one_the_trainer_accepts(packed_prefix, tmp_path):
    """The runs are ``longnet-train`` with overrides only: the CLI must read the first as one (the
    GPU run once failed with "config file model.preset=125m does not exist")."""
    from click.testing import CliRunner

    from longnet_megatron.train.cli import main

    tool = load_tool("bench_fp8")
    args = tool.parse_args(["--preset", "tiny", "--seq-length", "128", "--steps", "20", "--backend", "sdpa"])
    command = tool.train_command(args, packed_prefix, tmp_path / "run", "delayed")
    assert command[1:3] == ["-m", "longnet_megatron.train"]
    result = CliRunner().invoke(main, [*command[3:], "--print-config"])
    assert result.exit_code == 0, result.output
    assert "preset: tiny" in result.output and "fp8: delayed" in result.output
    assert "attention_backend: sdpa" in result.output


def test_results_are_written_after_each_run(tmp_path):
    """A benchmark cut off by its time limit keeps the runs that finished (the bf16 one alone here)."""
    tool = load_tool("bench_fp8")
    args = tool.parse_args(["--steps", "20", "--out", str(tmp_path / "fp8")])
    table = tool.write_results(args, "python tools/bench_fp8.py", {"bf16": _rows([(1, 11.0), (10, 8.0)])})
    saved = json.loads((tmp_path / "fp8.json").read_text())
    assert list(saved["runs"]) == ["bf16"] and saved["comparison"] == {}
    assert "| bf16 | 11.0000 | 8.0000 | - | - | 1,000 |" in table
    assert (tmp_path / "fp8.md").read_text() == table
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_streams_its_log_and_returns_its_train_records(packed_prefix, tmp_path, capsys):
    """One real (bf16, CPU) run through the benchmark's own ``train``: the records come back and the
    child's output is in ``train.log`` (what a run cut off by a time limit leaves behind)."""
    tool = load_tool("bench_fp8")
    args = tool.parse_args(["--preset", "tiny", "--seq-length", "128", "--global-batch", "2", "--steps", "3"])
    rows = tool.train(args, packed_prefix, tmp_path / "bf16", None)
    assert [r["step"] for r in rows][-1] == 3 and all(r["kind"] == "train" for r in rows)
    assert "step" in (tmp_path / "bf16" / "train.log").read_text()
    assert "bf16: started" in capsys.readouterr().out
