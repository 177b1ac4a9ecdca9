"""tools/bench_decode.py: a CPU smoke run (tiny shapes, fp32) writes its table, and its numbers hang together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "bench_decode.py")


@pytest.mark.slow
def test_cpu_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "decode"
    command = [
        sys.executable, SCRIPT, "--device=cpu", "--dtype=fp32", "--presets=tiny", "--contexts=256",
        "--base-segment=32", "--decode-steps=3", "--uncached-steps=2", "--prefill-chunk=100", f"--out={out}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["status"] == "ok" and row["patterns"] == 4  # w = 32, 64, 128, 256
    assert row["decode_tokens_per_s"] > 0 and row["uncached_steps"] == 2 and row["prefill_s"] > 0
    assert row["cache_bytes"] < row["dense_kv_bytes"] and row["key_bound"] == 32 * 4  # 32 keys a pattern
    assert 0 < row["keys_per_step"] <= row["key_bound"] * 4 * 2  # heads x layers
    assert row["max_logit_diff"] < 1e-4  # fp32: the cached and uncached logits agree
    table = out.with_suffix(".md").read_text()
    assert "| tiny | 256 | 4 |" in table and "bench_decode.py --device=cpu" in table
