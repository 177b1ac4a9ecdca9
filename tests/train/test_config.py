"""The configuration schema: YAML + dotted overrides, and errors that name the key before any work."""

from __future__ import annotations

import os
import subprocess

import pytest

from longnet_megatron.train.config import ConfigError, JobConfig, load_config
from longnet_megatron.train.job import resolve_job
from tests.train.conftest import REPO
from tests.train.launching import launch_env, train_command

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def job(packed_prefix, *overrides: str) -> JobConfig:
    return load_config(TINY, [f"data.prefixes=[{packed_prefix}]", *overrides])


def test_overrides_are_typed_and_applied_in_order(packed_prefix):
    cfg = job(
        packed_prefix,
        "optim.lr=3e-4",
        "train.steps=7",
        "train.steps=90",
        "model.use_te=null",
        "model.segment_lengths=[32,64]",
        "model.dilation_rates=[1,2]",
        "data.weights=[1]",
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 90 and cfg.model.use_te is None
    assert cfg.model.segment_lengths == [32, 64] and cfg.data.weights == [1.0]
    assert resolve_job(cfg, world_size=1).seq_length == 128  # from the packed data


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["parallel.tensor_model_parallel_size=3"],
            3,
            "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3",
        ),
        (
            ["model.num_attention_heads=6", "model.hidden_size=66", "parallel.tensor_model_parallel_size=4"],
            4,
            "model.num_attention_heads=6 is not divisible by parallel.tensor_model_parallel_size=4",
        ),
        (
            ["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"],
            2,
            "model.num_layers=3 is not divisible by parallel.pipeline_model_parallel_size=2",
        ),
        (
            ["parallel.context_parallel_size=3"],
            3,
            "model.seq_length=128 is not divisible by parallel.context_parallel_size=3",
        ),
        (["model.segment_lengths=[64,32]", "model.dilation_rates=[1,2]"], 1, "model.segment_lengths"),
        (["model.segment_lengths=[64,128]", "model.dilation_rates=[2,4]"], 1, "model.segment_lengths"),
        (["data.prefixes=[/nonexistent/packed]"], 1, "data.prefixes[0]='/nonexistent/packed'"),
        (["data.prefixes=[]"], 1, "data.prefixes is empty"),
        (["model.seq_length=256"], 1, "model.seq_length=256 differs from the data's packed length 128"),
        (
            ["train.global_batch_size=6", "train.micro_batch_size=4"],
            1,
            "train.global_batch_size=6 is not divisible by train.micro_batch_size=4",
        ),
        (
            ["train.global_batch_size=4", "train.micro_batch_size=4"],
            2,
            "train.global_batch_size=4 is not divisible by train.micro_batch_size=4 * data-parallel size 2",
        ),
        (["parallel.tensor_model_parallel_size=2"], 3, "the world size 3 is not divisible"),
        (["train.precision=fp8"], 1, "train.precision='fp8' is not one of"),
        (["model.preset=13b"], 1, "model.preset='13b' is not one of"),
        (["optim.warmup_steps=400"], 1, "optim.warmup_steps=400 must be shorter than the decay"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs"),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            1,
            "needs parallel.pipeline_model_parallel_size >= 2",
        ),
        (["data.weights=[1,2]"], 1, "data.weights has 2 entries for 1 data.prefixes"),
        (
            ["checkpoint.init_from=/nonexistent/run"],
            1,
            "checkpoint.init_from=/nonexistent/run is not a directory",
        ),
        (["checkpoint.load=/nonexistent/ckpt"], 1, "checkpoint.load=/nonexistent/ckpt is not a directory"),
        (["model.loss_chunk_tokens=-1"], 1, "model.loss_chunk_tokens=-1 must be >= 0"),
    ],
)
def test_bad_configs_name_the_key(packed_prefix, overrides, world, message):
    with pytest.raises(ConfigError) as err:
        resolve_job(job(packed_prefix, *overrides), world_size=world)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key 'train.stepz'; did you mean train.steps?"),
        ("trian.steps=3", "unknown section 'trian'"),
        ("train.steps=many", "train.steps='many' must be an integer"),
        ("train.steps=1.5", "train.steps=1.5 must be an integer"),
        ("optim.lr=fast", "optim.lr='fast' must be a number"),
        ("data.prefixes=abc", "data.prefixes='abc' must be a list"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel='maybe' must be true or false"),
        ("train.steps", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_every_attention_backend_name_is_accepted_and_a_typo_is_not():
    for name in ("fa4", "sdpa-cudnn", "triton-fused"):
        resolve_job(
            load_config(None, ["data.synthetic=true", f"model.attention_backend={name}"]), world_size=1
        )
    with pytest.raises(ConfigError, match="model.attention_backend='fa5' is not one of"):
        resolve_job(load_config(None, ["data.synthetic=true", "model.attention_backend=fa5"]), world_size=1)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], None),  # tiny at L=256: 256 x 256 fp32 logits, far below 1 GiB
        (["model.preset=125m", "model.seq_length=32768"], 4096),  # 32K x 100352 x 4 B = 12 GiB
        (["model.preset=125m", "model.seq_length=32768", "model.loss_chunk_tokens=0"], None),
        (["model.preset=125m", "model.seq_length=2048"], None),  # 0.77 GiB
        (["model.preset=125m", "model.seq_length=2048", "train.micro_batch_size=2"], 4096),
        (["model.preset=125m", "model.seq_length=4096", "parallel.tensor_model_parallel_size=4"], None),
        (["model.loss_chunk_tokens=100"], 100),
    ],
)
def test_loss_chunk_tokens_resolves_automatically_by_logits_size(overrides, expected):
    from longnet_megatron.train.model import loss_chunk_tokens

    cfg = load_config(None, ["data.synthetic=true", *overrides])
    world = cfg.layout.model_parallel_size()  # one model replica
    assert loss_chunk_tokens(resolve_job(cfg, world_size=world)) == expected


def test_bad_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stesp: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stesp'; did you mean train.steps\?"):
        load_config(str(path))


@pytest.mark.slow
def test_cli_rejects_a_bad_config_before_starting(packed_prefix):
    env = launch_env(RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    result = subprocess.run(
        train_command(f"data.prefixes=[{packed_prefix}]", "parallel.tensor_model_parallel_size=3", "--check"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"
        in result.stderr
    )
    ok = subprocess.run(
        train_command(f"data.prefixes=[{packed_prefix}]", "--check"),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "configuration OK" in ok.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.synthetic=true", "data.document_masking=true"],
            "data.document_masking=true needs documents, and data.synthetic=true gives one stream",
        ),
        (
            ["data.synthetic=true", "data.reset_position_ids=true"],
            "data.reset_position_ids=true needs documents",
        ),
        (["data.synthetic=true", "data.synthetic_document_length=-4"], "data.synthetic_document_length=-4"),
    ],
)
def test_document_masking_needs_documents(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_job(load_config(TINY, overrides), world_size=1)
    assert message in str(err.value)


def test_document_masking_needs_end_of_document_tokens(packed_prefix, tmp_path):
    """Packed data whose train split names no end-of-document token is refused before any work."""
    import glob
    import json
    import shutil

    prefix = str(tmp_path / "packed")
    for path in glob.glob(packed_prefix + "*"):
        if os.path.isfile(path):
            shutil.copy(path, path.replace(packed_prefix, prefix))
    meta = prefix + "_train.meta.json"
    with open(meta) as f:
        content = json.load(f)
    content.pop("eod_id")
    with open(meta, "w") as f:
        json.dump(content, f)
    with pytest.raises(
        ConfigError, match=r"data.document_masking=true needs end-of-document tokens, and data.prefixes\[0\]"
    ):
        resolve_job(job(prefix, "data.document_masking=true"), world_size=1)
    resolve_job(
        job(packed_prefix, "data.document_masking=true", "data.reset_position_ids=true"), world_size=1
    )
    synthetic = ["data.synthetic=true", "data.document_masking=true", "data.synthetic_document_length=40"]
    resolve_job(load_config(TINY, synthetic), world_size=1)


def test_a_key_given_twice_in_yaml_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  steps: 5\n  micro_batch_size: 1\n  steps: 50\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice \(lines 2 and 4\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(None, ["data.weights={a: 1, a: 2}"])
