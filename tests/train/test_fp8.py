"""FP8 (model.fp8): the TransformerConfig fields it sets, and one-line errors wherever it cannot run."""

from __future__ import annotations

import subprocess

import pytest
import torch

from longnet_megatron.model.specs import transformer_engine_available
from longnet_megatron.train.config import ConfigError, load_config
from longnet_megatron.train.fp8 import check_fp8_device, fp8_unavailable
from longnet_megatron.train.job import resolve_job
from tests.train.launching import launch_env, train_command

FP8 = ["data.synthetic=true", "train.precision=bf16", "model.fp8=delayed"]


def test_fp8_maps_onto_megatron_transformer_config_fields():
    from longnet_megatron.train.model import transformer_config

    job = load_config(None, [*FP8[:2], "model.fp8=tensorwise", "model.fp8_format=e4m3", "model.fp8_margin=1"])
    config = transformer_config(resolve_job(job, world_size=1))
    assert (config.fp8, config.fp8_recipe, config.fp8_margin) == ("e4m3", "tensorwise", 1)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (1024, "max")
    off = transformer_config(resolve_job(load_config(None, FP8[:2]), world_size=1))
    assert off.fp8 is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.fp8=mxfp8"], "model.fp8='mxfp8' is not one of delayed, tensorwise, blockwise"),
        (["train.precision=fp32"], "model.fp8=delayed needs train.precision=bf16"),
        (["train.precision=fp16"], "model.fp8=delayed needs train.precision=bf16"),
        (
            ["model.use_te=false"],
            "model.fp8=delayed runs the Transformer Engine linears: it needs model.use_te",
        ),
        (["model.fp8_format=e5m2"], "model.fp8_format='e5m2' is not one of hybrid, e4m3"),
        (["model.seq_length=200"], "FP8 GEMMs need the tokens of a micro-batch on a rank"),
    ],
)
def test_fp8_configuration_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_job(load_config(None, [*FP8, *overrides]), world_size=1)
    assert message in str(err.value)


def test_fp8_unavailable_says_why():
    ok = dict(te_layers=True, te_importable=True, cuda=True, capability=(9, 0))
    assert fp8_unavailable("delayed", **ok) is None
    assert fp8_unavailable("blockwise", **ok) is None
    assert fp8_unavailable("tensorwise", **{**ok, "capability": (8, 9)}) is None  # Ada
    assert "Transformer Engine layers" in fp8_unavailable("delayed", **{**ok, "te_layers": False})
    assert "not importable" in fp8_unavailable("delayed", **{**ok, "te_importable": False})
    assert "CUDA GPU" in fp8_unavailable("delayed", **{**ok, "cuda": False, "capability": None})
    assert "compute capability 8.0; delayed scaling needs 8.9" in fp8_unavailable(
        "delayed", **{**ok, "capability": (8, 0)}
    )
    assert "blockwise scaling needs 9.0" in fp8_unavailable("blockwise", **{**ok, "capability": (8, 9)})
    assert "Transformer Engine 2.3.0.dev0 or newer" in fp8_unavailable(
        "blockwise", **{**ok, "te_version_ok": False}
    )


@pytest.mark.skipif(torch.cuda.is_available() and transformer_engine_available(), reason="FP8 may run here")
def test_fp8_is_refused_on_this_machine_with_the_reason():
    job = load_config(None, FP8)
    with pytest.raises(ConfigError, match=r"^model\.fp8=delayed cannot run: ") as err:
        check_fp8_device(job.model)
    reason = "not importable" if not transformer_engine_available() else "CUDA GPU"
    assert reason in str(err.value) and "\n" not in str(err.value)
    check_fp8_device(load_config(None, FP8[:2]).model)  # off: nothing to check


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cli_refuses_fp8_on_cpu_in_one_line():
    result = subprocess.run(
        train_command(*FP8, "train.steps=2", "optim.warmup_steps=0", "logging.tensorboard=false"),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "model.fp8" in line]
    assert lines == [
        "longnet-train: configuration error: model.fp8=delayed cannot run: "
        + (
            "Transformer Engine is not importable here"
            if not transformer_engine_available()
            else "it needs a CUDA GPU (this run is on the CPU)"
        )
        + "; set model.fp8=null for bf16"
    ]
    assert "Traceback" not in result.stderr
