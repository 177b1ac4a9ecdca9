"""The sequence-chunked MLP: the same outputs and gradients as Megatron's MLP, on CPU with local layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.mlp import MLP

from longnet_megatron.model import build_longnet_gpt, get_longnet_layer_spec, get_preset, make_longnet_config
from longnet_megatron.model.chunked_mlp import ChunkedMLP
from longnet_megatron.model.specs import with_chunked_mlp
from longnet_megatron.parallel.layout import init_single_process


@pytest.fixture(autouse=True, scope="module")
def _megatron():
    init_single_process()


def tiny_model(dtype: torch.dtype, mlp_chunk_tokens: int | None = None, **config):
    """The tiny preset (2 layers, L=256) with Megatron's local layers, weights from one seed."""
    torch.manual_seed(0)
    preset = get_preset("tiny")
    overrides = {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "mlp_chunk_tokens": mlp_chunk_tokens,
        **config,
    }
    return build_longnet_gpt(preset, config=make_longnet_config(preset, **overrides), use_te=False)


def loss_and_grads(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed token loss of ``tokens`` (next-token labels) and every parameter's gradient."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, positions, None, labels=labels).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_spec_swaps_only_the_mlp_module():
    plain = get_longnet_layer_spec(False)
    chunked = get_longnet_layer_spec(False, mlp_chunk_tokens=64)
    assert plain.submodules.mlp.module is MLP and chunked.submodules.mlp.module is ChunkedMLP
    assert chunked.submodules.mlp.params == {"chunk_tokens": 64}
    assert chunked.submodules.mlp.submodules == plain.submodules.mlp.submodules
    assert dataclasses.replace(chunked.submodules, mlp=plain.submodules.mlp) == plain.submodules
    assert with_chunked_mlp(chunked, 32).submodules.mlp.params == {"chunk_tokens": 32}
    other = dataclasses.replace(plain.submodules.mlp, module=torch.nn.Identity)  # e.g. an MoE layer
    with pytest.raises(ValueError, match="dense MLP"):
        with_chunked_mlp(
            dataclasses.replace(plain, submodules=dataclasses.replace(plain.submodules, mlp=other)), 64
        )


@pytest.mark.parametrize("chunk", [64, 100, 256])  # even chunks, a short last chunk, one chunk (no split)
def test_chunked_mlp_module_matches_the_mlp_in_float64(chunk):
    model = tiny_model(torch.float64, chunk)
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, ChunkedMLP) and mlp.chunk_tokens == chunk
    x = torch.randn(256, 2, 64, dtype=torch.float64, requires_grad=True)
    out, bias = mlp(x)
    expected, expected_bias = MLP.forward(mlp, x)  # the parent's forward on the same weights
    assert bias is expected_bias is mlp.linear_fc2.bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out, expected = out + bias, expected + expected_bias  # the layer's bias-dropout-add
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *mlp.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no checkpoint without gradients, same values
        torch.testing.assert_close(mlp(x)[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", [{}, {"recompute_granularity": "full", "recompute_method": "uniform",
                                             "recompute_num_layers": 1}])  # fmt: skip
def test_a_model_with_chunked_mlps_has_the_same_loss_and_gradients(recompute):
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(tiny_model(torch.float32, None, **recompute), tokens)
    chunked_model = tiny_model(torch.float32, 96, **recompute)
    assert all(isinstance(layer.mlp, ChunkedMLP) for layer in chunked_model.decoder.layers)
    loss, grads = loss_and_grads(chunked_model, tokens)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-4)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        # float32 sums over the chunks' tokens in another order: within 1e-5 of the largest entry
        scale = reference[1][name].abs().max().item()
        torch.testing.assert_close(g, reference[1][name], rtol=1e-5, atol=1e-5 * max(scale, 1e-3), msg=name)


def test_chunking_needs_a_positive_chunk():
    with pytest.raises(ValueError, match="mlp_chunk_tokens=-1"):
        make_longnet_config("tiny", mlp_chunk_tokens=-1)


def test_the_megatron_notice_about_the_mlp_type_is_dropped(caplog):
    with caplog.at_level("WARNING"):
        tiny_model(torch.float32, 64)
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]
