"""One checkpoint evaluated under TP=2, PP=2, CP=2, at TP=1 and as its export gives the same numbers;
the trainer's ``eval`` section equals ``longnet-eval perplexity``; the command line's outputs and
one-line errors."""

from __future__ import annotations

import math

import torch

from .eval_workers import CONTEXTS, DEPTHS, LENGTHS, SEQUENCES


def _close_results(a: dict, b: dict, rel: float = 1e-5) -> None:
    for ra, rb in zip(a["ppl"]["contexts"], b["ppl"]["contexts"], strict=True):
        assert ra["context"] == rb["context"] and ra["tokens"] == rb["tokens"]
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=rel)
        for x, y in zip(ra["by_position"], rb["by_position"], strict=True):
            assert (x is None) == (y is None) and (x is None or math.isclose(x, y, rel_tol=rel))
    pa, pb = a["pk"], b["pk"]
    assert pa["accuracy"] == pb["accuracy"]
    assert [r["key"] for r in pa["rows"]] == [r["key"] for r in pb["rows"]]
    for x, y in zip(pa["rows"], pb["rows"], strict=True):
        assert math.isclose(x["key_logprob"], y["key_logprob"], rel_tol=rel, abs_tol=1e-4)


def test_every_layout_and_the_export_agree(parallel, single):
    reference = single["hf"]
    for name in ("tp2", "pp2", "cp2"):
        for rank in parallel:  # every rank returns the same results
            _close_results(rank[name], reference)
    _close_results(single["tp1"], reference)
    ppl = reference["ppl"]
    assert [r["context"] for r in ppl["contexts"]] == CONTEXTS
    assert ppl["model"]["kind"] == "export" and parallel[0]["tp2"]["ppl"]["model"]["layout"]["tp"] == 2
    assert parallel[0]["cp2"]["pk"]["model"]["layout"]["cp"] == 2
    assert reference["pk"]["lengths"] == LENGTHS and reference["pk"]["depths"] == DEPTHS
    # a short trained model: more context helps (the loss is not flat)
    assert ppl["contexts"][-1]["loss"] < ppl["contexts"][0]["loss"]


def test_scorer_equals_the_full_logits_of_the_export(single):
    ours, full = single["hand"]["losses"]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    ours, full = single["hand"]["logits"]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_trainer_eval_section_logs_loss_by_position(parallel, single):
    records = [r for r in parallel[0]["metrics"] if r["kind"] == "eval"]
    assert [r["step"] for r in records] == [2, 4]
    last = records[-1]
    assert last["sequences"] == SEQUENCES and "loss_64-128" in last and "loss_0-1" in last
    assert any(tag.startswith("eval/loss_") for tag in parallel[0]["tensorboard"])
    assert "eval/loss" in parallel[0]["tensorboard"]
    # the checkpoint saved right after step 4, evaluated by longnet-eval at the full context
    full = single["hf"]["ppl"]["contexts"][-1]
    assert full["context"] == 128
    assert math.isclose(last["loss"], full["loss"], rel_tol=1e-5)
    for x, y in zip(last["buckets"]["loss"], full["by_position"], strict=True):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_command_line_writes_json_markdown_and_plots(single):
    cli = single["cli"]
    for name in ("perplexity", "perplexity_hf", "passkey_extended", "report"):
        assert cli[name]["exit_code"] == 0, cli[name]
    assert {"ppl.json", "ppl.md", "ppl.png", "pk.json", "pk.md", "pk.png"} <= set(single["files"])
    assert {"report.md", "report_perplexity.png", "report_passkey.png"} <= set(single["files"])
    pk = single["results"]["pk"]
    assert pk["model"]["patterns_source"] == "override"
    assert pk["model"]["patterns"] == [[64, 1], [128, 2], [256, 4], [512, 8]]
    assert single["results"]["ppl"]["run"]["command"].startswith("longnet-eval perplexity")
    assert "loss by context" in cli["perplexity"]["output"]


def test_bad_input_is_one_line_naming_it(single):
    cli = single["cli"]
    expected = {
        "no_tokenizer": "records no tokenizer",
        "other_tokenizer": "was tokenized with",
        "context_too_long": "--contexts 256",
        "too_long_to_fit": "--lengths 1073741824",
        "too_short": "--lengths 100",
        "bad_patterns": "--segment-lengths/--dilation-rates",
        "missing": "does not exist",
        "export_with_tp": "runs in one process",
        "report_bad": "not a result of longnet-eval",
    }
    for name, text in expected.items():
        result = cli[name]
        assert result["exit_code"] == 1, (name, result)
        assert text in result["output"], (name, result["output"])
        assert result["output"].strip().count("\n") == 0, (name, result["output"])
        assert "Traceback" not in result["output"]
