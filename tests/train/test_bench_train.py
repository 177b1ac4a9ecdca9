"""tools/bench_train.py: context parsing, the planner's choice retried with full recompute after an OOM,
and a CPU smoke run of both models (tiny preset, one warm-up and one timed step each, every
configuration in its own subprocess; the planner's auto is none on CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.tool_scripts import TOOLS, load_tool


def test_contexts_parse_with_binary_suffixes():
    tool = load_tool("bench_train")
    assert tool.parse_contexts("8K,32k,1M,300") == [8192, 32768, 1048576, 300]
    assert [tool.short(n) for n in (8192, 1048576, 300)] == ["8K", "1M", "300"]


def test_oom_is_retried_with_full_recompute_and_reported():
    tool = load_tool("bench_train")
    args = tool.parse_args(["--device", "cpu", "--fp8", "delayed"])
    calls = []

    def runner(spec, timeout_s):
        calls.append(spec["recompute"])
        assert spec["fp8"] == "delayed"
        if spec["recompute"] == "auto" or spec["context"] > 8192:
            return {"status": "OOM"}
        return {
            "status": "ok",
            "step_ms": 10.0,
            "recompute": "full (uniform, 1 layer)",
            "env": {"device": "x"},
        }

    row, env = tool.run_configuration("longnet", "125m", 8192, args, runner)
    assert calls == ["auto", "full"] and row.status == "ok" and row.recompute == "full (uniform, 1 layer)"
    assert env == {"device": "x"} and row.fp8 == "delayed"
    calls.clear()
    row, _ = tool.run_configuration("dense", "125m", 16384, args, runner)
    assert calls == ["auto", "full"] and row.status == "OOM"
    args = tool.parse_args(["--device", "cpu", "--recompute", "none", "--fp8", "delayed"])
    calls.clear()
    row, _ = tool.run_configuration("dense", "125m", 16384, args, runner)
    assert calls == ["none"] and (row.status, row.recompute) == ("OOM", "none")


@pytest.mark.slow
def test_cpu_smoke_run_measures_both_models(tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable,
        str(TOOLS / "bench_train.py"),
        "--device=cpu",
        "--presets=tiny",
        "--contexts=256",
        "--base-segment=64",
        "--precision=fp32",
        "--warmup=1",
        "--steps=1",
        "--loss-chunk-tokens=100",  # the chunked output layer + loss inside the trainer
        "--doc-lens=0,40",  # LongNet unmasked, and masked on documents of ~40 tokens
        f"--out={out}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=TOOLS.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["kind"], r["doc_len"], r["status"]) for r in rows] == [
        ("longnet", None, "ok"),
        ("longnet", 40, "ok"),
        ("dense", None, "ok"),
    ]
    rows = [rows[0], rows[2]]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_gib"] > 0
        assert r["loss_chunk_tokens"] == 100 and r["recompute"] == "none"
        assert abs(r["loss"] - math.log(256)) < 1.0  # random tokens: about ln V
    assert rows[0]["attention"].startswith("dilated") and rows[1]["attention"] == "Megatron local"
    table = out.with_suffix(".md").read_text()
    assert (
        "| longnet | tiny | 256 | - | - | none | 100 |" in table and "| dense | tiny | 256 | - | - |" in table
    )
    assert "| longnet | tiny | 256 | 40 | - | none | 100 |" in table  # documents of 40, no FP8
