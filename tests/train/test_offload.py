"""Offloading checkpointed layer inputs: exact gradients, and exactly the chosen layers' inputs moved."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from longnet_megatron.model import build_longnet_gpt, get_preset, make_longnet_config
from longnet_megatron.parallel.layout import init_single_process
from longnet_megatron.train.offload import (
    LayerInputOffloader,
    checkpointed_layer_indices,
    from_host,
    layer_input_offloader,
    to_host,
)

FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


@pytest.fixture(autouse=True, scope="module")
def _megatron():
    init_single_process()


def model_with(layers: int = 4, **config):
    """The tiny preset with ``layers`` local layers (our dilated attention), fp32 on CPU, one seed."""
    torch.manual_seed(0)
    preset = get_preset("tiny").replace(num_layers=layers)
    return build_longnet_gpt(preset, config=make_longnet_config(preset, **config), use_te=False)


def loss_and_grads(model, tokens, offloader: LayerInputOffloader | None = None):
    """Summed token loss and every parameter's gradient, the forward inside ``offloader``."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    if offloader is None:
        loss = model(tokens, positions, None, labels=labels).sum()
    else:
        with offloader:
            loss = model(tokens, positions, None, labels=labels).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def layer_inputs(model) -> dict[int, list[torch.Tensor]]:
    """Every TransformerLayer's ``hidden_states`` argument, by layer number (recorded by a pre-hook)."""
    seen: dict[int, list[torch.Tensor]] = {}
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen.setdefault(m.layer_number, []).append(kwargs["hidden_states"]),
            with_kwargs=True,
        )
    return seen


@pytest.mark.parametrize(
    ("recompute", "k", "expected"),
    [
        (FULL, 2, [1, 2]),
        (FULL, 4, [1, 2, 3, 4]),
        ({**FULL, "recompute_num_layers": 2}, 2, [1, 3]),  # uniform groups of 2: inputs of layers 1, 3
        ({**FULL, "recompute_method": "block", "recompute_num_layers": 3}, 2, [1, 2]),
        ({**FULL, "recompute_method": "block", "recompute_num_layers": 3}, 3, [1, 2, 3]),
    ],
)
def test_offloading_is_exact_and_moves_only_the_chosen_layer_inputs(monkeypatch, recompute, k, expected):
    tokens = torch.randint(0, 256, (2, 256))
    reference = loss_and_grads(model_with(**recompute), tokens)

    model = model_with(**recompute)
    inputs = layer_inputs(model)
    offloader = layer_input_offloader(model, k)
    moved, unpacked = [], []
    monkeypatch.setattr(
        "longnet_megatron.train.offload.to_host", lambda t, *a: moved.append(t) or to_host(t, *a)
    )
    monkeypatch.setattr(
        "longnet_megatron.train.offload.from_host", lambda s: unpacked.append(s) or from_host(s)
    )
    loss, grads = loss_and_grads(model, tokens, offloader)

    assert offloader.offloaded == expected
    # The very tensors the chosen layers were called with in the forward (their first call; the
    # recompute in backward calls them again), and nothing else; each copied back once.
    assert len(moved) == k and all(t is inputs[n][0] for t, n in zip(moved, expected))
    assert len(unpacked) == k
    assert torch.equal(loss, reference[0])
    for name, g in grads.items():
        assert torch.equal(g, reference[1][name]), name


def test_outside_the_context_and_without_gradients_nothing_moves():
    model = model_with(**FULL)
    offloader = layer_input_offloader(model, 2)
    tokens = torch.randint(0, 256, (1, 256))
    positions = torch.arange(256)[None]
    model(tokens, positions, None, labels=tokens).sum().backward()
    assert offloader.offloaded == []
    with torch.no_grad(), offloader:  # evaluation: nothing is saved, no complaint
        model(tokens, positions, None, labels=tokens)
    assert offloader.offloaded == []
    offloader.remove()
    with offloader:
        model(tokens, positions, None, labels=tokens).sum().backward()
    assert offloader.offloaded == []


def test_a_layer_that_is_not_recomputed_is_refused():
    model = model_with(**{**FULL, "recompute_method": "block", "recompute_num_layers": 2})
    assert checkpointed_layer_indices(model.config, 4) == [0, 1]
    with pytest.raises(ValueError, match="saves 2 checkpointed layer inputs"):
        layer_input_offloader(model, 3)
    with pytest.raises(ValueError, match="saves 0"):
        layer_input_offloader(model_with(), 1)
    # A checkpoint that saves its inputs through its own hooks (torch's non-reentrant one) keeps them
    # from the offloader: it says so instead of silently moving nothing.
    offloader = layer_input_offloader(model, 2)
    tokens = torch.randint(0, 256, (1, 256))
    forward = partial(model, labels=tokens)
    with pytest.raises(RuntimeError, match=r"inputs of layers \[1, 2\] were never saved"), offloader:
        checkpoint(forward, tokens, torch.arange(256)[None], None, use_reentrant=False)


def test_host_copies_keep_shape_strides_and_dtype():
    t = torch.randn(6, 4, dtype=torch.float64).t()[1:]  # a strided view with an offset
    saved = to_host(t, torch.device("cpu"))
    assert saved.host is not t and saved.host.stride() == t.stride()
    back = from_host(saved)
    assert back.shape == t.shape and back.stride() == t.stride() and back.dtype == t.dtype
    assert torch.equal(back, t)


def _trainer_losses(run_dir: str) -> dict:
    """Two steps of the tiny job with full recompute, without and with both memory savers."""
    from longnet_megatron.train.config import load_config
    from longnet_megatron.train.distributed import world_from_env
    from longnet_megatron.train.job import resolve_job
    from longnet_megatron.train.trainer import Trainer

    runs = {"plain": [], "savers": ["model.offload_layer_inputs=2", "model.mlp_chunk_tokens=64"]}
    out = {}
    for name, extra in runs.items():
        overrides = ["data.synthetic=true", "train.steps=2", "train.global_batch_size=2", "train.eval_interval=0",
                     "logging.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_steps=0",
                     "train.exit_signal_handling=false", f"run.dir={run_dir}/{name}", "model.recompute=full", *extra]  # fmt: skip
        trainer = Trainer(resolve_job(load_config(None, overrides), world_from_env().world_size))
        trainer.train()
        trainer.close()
        offloaded = trainer.offloader.offloaded if trainer.offloader else None
        out[name] = ([r["loss"] for r in trainer.history], offloaded, trainer.model_config.mlp_chunk_tokens)
    return out


def test_the_trainer_runs_the_offloader_and_the_chunked_mlp(tmp_path):
    from longnet_megatron.testing import run_distributed

    (result,) = run_distributed(_trainer_losses, 1, layout=None, args=(str(tmp_path),), timeout_s=300)
    assert result["plain"][1:] == (None, None) and result["savers"][1:] == ([1, 2], 64)
    assert result["savers"][0] == pytest.approx(result["plain"][0], rel=1e-6)
