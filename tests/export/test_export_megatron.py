"""Megatron checkpoints (TP=2, PP=2) -> exported folders -> the plain PyTorch model, and back."""

from __future__ import annotations

import json

import pytest
import torch

from longnet_megatron.export import LongNetForCausalLM
from longnet_megatron.export.plain import WEIGHTS_INDEX_FILE

from . import export_workers as workers

# fp32 on CPU: the exported model runs the same operations in another order (separate q/k/v
# projections, [b, s] instead of [s, b] layout), so results agree to rounding, not bit for bit.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("case", ["tp2", "pp2"])
def test_exported_logits_equal_megatron_logits(case, converted, megatron_logits, workdir):
    model = LongNetForCausalLM.from_pretrained(workdir / f"hf_{case}", attention_backend="reference")
    inputs, _ = workers.tokens(0)
    with torch.no_grad():
        logits = model(inputs)
    torch.testing.assert_close(logits, megatron_logits[case], **FP32)


def test_tp2_export_keeps_the_checkpoints_vocabulary_padding(converted, saved, workdir):
    config = json.loads((workdir / "hf_tp2" / "config.json").read_text())
    assert config["vocab_size"] == saved[0]["tp2"]["padded_vocab"] == 384
    assert config["tokenizer_vocab_size"] == 257
    assert config["eos_token_id"] == 256


def test_large_export_is_sharded_with_an_index(converted, workdir):
    assert converted["cli_to_hf"]["exit_code"] == 0, converted["cli_to_hf"]
    folder = workdir / "hf_pp2"
    index = json.loads((folder / WEIGHTS_INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert not (folder / "model.safetensors").exists()


def test_export_folder_has_everything_a_user_needs(converted, workdir):
    folder = workdir / "hf_tp2"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "configuration_longnet.py",
        "modeling_longnet.py",
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longnet.LongNetHFForCausalLM"
    assert config["megatron_record"]["layout"]["tp"] == 2


def test_megatron_to_hf_to_megatron_gives_identical_tensors(converted):
    assert converted["cli_from_hf"]["exit_code"] == 0, converted["cli_from_hf"]
    names_original, names_back = converted["round_trip"]["names"]
    assert names_original == names_back
    assert converted["round_trip"]["unequal"] == []


def test_resharded_checkpoint_resumes_training_with_the_same_loss(saved):
    original = saved[0]["tp2"]["train"]
    resharded = next(r for r in saved if r["last_stage"])["resharded"]["train"]
    assert len(original) == len(resharded) == workers.TRAIN_STEPS
    torch.testing.assert_close(torch.tensor(resharded), torch.tensor(original), rtol=1e-5, atol=1e-6)


def test_resharded_checkpoint_exports_like_the_original(converted, workdir):
    a = LongNetForCausalLM.from_pretrained(workdir / "hf_tp2")
    b = LongNetForCausalLM.from_pretrained(workdir / "hf_resharded")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    record = json.loads((workdir / "hf_resharded" / "config.json").read_text())["megatron_record"]
    assert record["layout"]["pp"] == 2 and record["layout"]["tp"] == 1


def test_trainer_description_exports_the_same_model(converted, workdir):
    """A checkpoint described the way longnet_megatron.train describes it (no model record)."""
    a = LongNetForCausalLM.from_pretrained(workdir / "hf_tp2")
    b = LongNetForCausalLM.from_pretrained(workdir / "hf_trainer_style")
    assert a.args.to_dict() == b.args.to_dict()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    ("case", "kind", "words"),
    [
        ("missing_shard", "truncated", ".distcp is missing"),
        ("short_shard", "truncated", "bytes, its metadata needs"),
        ("no_common", "truncated", "common.pt is missing"),
        ("dangling_latest", "truncated", "iter_0000099"),
        ("wrong_architecture", "mismatched", "does not match the architecture"),
        ("no_metadata", "truncated", "metadata.json is missing"),
        ("foreign_dist_checkpoint", "foreign", "not saved by longnet-megatron"),
        ("not_a_checkpoint", "foreign", "not a Megatron dist checkpoint"),
        ("does_not_exist", "missing", "does not exist"),
    ],
)
def test_bad_checkpoint_gives_a_clear_error_naming_the_path(case, kind, words, converted):
    if case == "no_common" and case not in converted["errors"]:
        pytest.skip("megatron-core 0.19+ writes no common.pt (its common state is in the shards)")
    got_kind, message = converted["errors"][case]
    assert got_kind == kind, message
    assert words in message
    assert f"bad/{case}" in message


def test_cli_reports_a_bad_checkpoint_in_one_line(converted):
    result = converted["cli_error"]
    assert result["exit_code"] == 1
    assert result["output"].startswith("Error: truncated checkpoint:")
    assert "Traceback" not in result["output"]


def test_reshard_cli_keeps_the_step_and_the_weights(converted, workdir):
    """`longnet-convert reshard` (its own gloo processes) then `to-hf` gives the original export."""
    import subprocess
    import sys

    def cli(*args: str) -> None:
        run = subprocess.run(
            [sys.executable, "-m", "longnet_megatron.export.cli", *args], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stdout + run.stderr

    out = workdir / "cli_reshard_tp2"
    cli("reshard", str(workdir / "tp2"), str(out), "--tp", "2")
    assert (out / "latest").read_text().strip() == "iter_0000007"  # the source's step
    cli("to-hf", str(out), str(workdir / "hf_cli_reshard"))
    a = LongNetForCausalLM.from_pretrained(workdir / "hf_tp2")
    b = LongNetForCausalLM.from_pretrained(workdir / "hf_cli_reshard")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
