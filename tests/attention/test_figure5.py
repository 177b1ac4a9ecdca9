"""tools/figure5.py without a GPU: the runtime model on synthetic measurements, the CP bytes against a
hand count, and the json/md/png written by ``--model-only`` with measured and modelled points flagged."""

from __future__ import annotations

import json

import pytest

from longnet_megatron.attention import DilatedAttentionConfig
from tests.tool_scripts import load_tool

H, D = 16, 128


@pytest.fixture(scope="module")
def tool():
    return load_tool("figure5")


def _dense(ns, a=2.5e-11, b=3e-9):
    return [{"n": n, "fwdbwd_s": a * n * n + b * n, "reps": 3, "flops": 1.0} for n in ns]


def _meta(**extra):
    meta = {"device": "synthetic", "torch": "-", "cudnn": "-", "date": "-", "command": "synthetic",
            "dtype": "bf16", "heads": H, "head_dim": D, "base_segment": 2048, "min_n": 8192, "max_reps": 5,
            "model_to": 32768, "link_gb_s": 400.0, "tokens_per_gpu": None}  # fmt: skip
    return {**meta, **extra}


def test_dense_fit_recovers_an_exact_quadratic(tool):
    a, b = tool.fit_dense(_dense([8192, 16384, 32768, 65536]))
    assert a == pytest.approx(2.5e-11, rel=1e-9) and b == pytest.approx(3e-9, rel=1e-6)
    assert tool.fit_dense(_dense([8192], b=0.0)) == (pytest.approx(2.5e-11), 0.0)


def test_dilated_one_gpu_extrapolation_follows_the_schedule_flops(tool):
    """At 32K the schedule has one more pattern: useful pairs N * 2048 * (1 + 1/2 + ... + 1/16) against
    16K's (1 + ... + 1/8), so t(32K) = 2 * (31/16) / (15/8) * t(16K) on the same GPU."""
    measured = {"dense": _dense([8192]), "dilated": {"sdpa": [{"n": 16384, "fwdbwd_s": 1.0}]}, "notes": []}
    result = tool.model(measured, _meta(tokens_per_gpu=32768))
    by_n = {p["n"]: p for p in result["points"]}
    assert by_n[16384]["sdpa"] == {"s": 1.0, "source": "measured"}
    assert by_n[32768]["sdpa"]["source"] == "modelled" and by_n[32768]["gpus"] == 1
    assert by_n[32768]["sdpa"]["s"] == pytest.approx(2 * (31 / 16) / (15 / 8))
    assert by_n[8192]["sdpa"]["s"] == pytest.approx(0.5 * (7 / 4) / (15 / 8))  # the 8K point was not measured
    assert by_n[8192]["dense-cudnn"]["source"] == "measured"
    one_point = measured["dense"][0]["fwdbwd_s"]  # one dense point: t = a N^2 through it
    assert by_n[16384]["dense-cudnn"] == {"s": pytest.approx(4 * one_point), "source": "modelled"}


def test_cp_bytes_and_flops_match_a_hand_count(tool):
    """4 ranks of 1024 tokens, 2 heads of 16, w = 256 * 2^k, r = 2^k: only w = 2048 (r = 8) and w = 4096
    (r = 16) cross ranks. A rank's message for a pattern holds k and v of its n/r rows for the 2 offsets
    that have a head: 2 * 16 * 2 * 1024/r elements, i.e. 16384 B (r = 8) and 8192 B (r = 16) in bf16.
    Rank 0 sends w=2048 keys to 1 reader and w=4096 keys to 3; rank 3 returns dk, dv for 1 + 3 sources;
    ranks 1 and 2 some of each: 40960 B each."""
    config = DilatedAttentionConfig.geometric(256, 64, max_segment=4096)
    costs = [tool.rank_cost(config, 1024, rank, 4, 2, 16, 2) for rank in range(4)]
    assert [c[1] for c in costs] == [40960] * 4
    # Every useful query-key pair is computed by exactly one rank.
    total = tool.useful_flops(config, 4096, 2, 16)
    assert sum(c[0] for c in costs) == pytest.approx(total)
    assert tool.busiest_rank(config, 1024, 4, 2, 16, 2) == {
        "flops": max(c[0] for c in costs),
        "bytes": 40960.0,
    }


def test_cp_model_adds_compute_at_the_measured_rate_and_bytes_over_the_link(tool):
    measured = {
        "dense": _dense([8192, 16384]),
        "dilated": {"fa4": [{"n": 16384, "fwdbwd_s": 0.5}]},
        "notes": [],
    }
    result = tool.model(measured, _meta(model_to=65536))
    rate = result["calibration"]["fa4"]["s_per_useful_flop"]
    for p in result["points"]:
        if p["gpus"] > 1:
            want = rate * 3.5 * p["rank_useful_flops"] + p["rank_bytes_sent"] / 400e9
            assert p["fa4"] == {"s": pytest.approx(want), "source": "modelled"}
            assert p["dense-cudnn"]["s"] == pytest.approx((2.5e-11 * p["n"] ** 2 + 3e-9 * p["n"]) / p["gpus"])
    assert [p["gpus"] for p in result["points"]] == [1, 1, 2, 4]


def test_model_only_writes_json_md_and_png_with_flags(tool, tmp_path):
    measured = {
        "dense": _dense([8192, 16384]),
        "dilated": {"sdpa": [{"n": 8192, "fwdbwd_s": 0.01}, {"n": 16384, "fwdbwd_s": 0.02}]},
        "notes": ["sdpa: out of memory at N=32768"],
    }
    source = tmp_path / "run.json"
    source.write_text(json.dumps({"meta": _meta(), "measured": measured}))
    out = tmp_path / "fig"
    tool.main(["--model-only", "--from", str(source), "--out", str(out), "--model-to", "65536"])
    saved = json.loads((tmp_path / "fig.json").read_text())
    flags = [(p["n"], p["sdpa"]["source"], p["dense-cudnn"]["source"]) for p in saved["model"]["points"]]
    assert flags == [
        (8192, "measured", "measured"),
        (16384, "measured", "measured"),
        (32768, "modelled", "modelled"),
        (65536, "modelled", "modelled"),
    ]
    md = (tmp_path / "fig.md").read_text()
    assert "| 16K | 1 | " in md and "(m)" in md and "(model)" in md and "ASSUMED 400 GB/s" in md
    assert "sdpa: out of memory at N=32768" in md
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_model_only_without_a_run_fails_in_one_line(tool, tmp_path):
    with pytest.raises(SystemExit, match="--model-only needs --from"):
        tool.main(["--model-only"])
    with pytest.raises(SystemExit, match=r"--from .*missing.json: cannot read a figure5 run"):
        tool.main(["--model-only", "--from", str(tmp_path / "missing.json")])
