"""Checkpointed layer inputs in host memory: most of what full recompute keeps, moved off the GPU.

Under full recompute (``recompute_granularity=full``) Megatron's ``CheckpointFunction`` runs each
checkpointed group of layers without gradients and keeps only its inputs (``ctx.save_for_backward``),
the hidden state among them: ``2 h`` bytes a token in bf16, 4 GiB per layer for the 1.3b preset at 1M
tokens. :class:`LayerInputOffloader` moves exactly those saved hidden states of the first k checkpointed
layers of a model chunk to host memory during forward, and copies each back when backward unpacks it::

    offloader = layer_input_offloader(gpt_model, k)    # the first k checkpointed layers
    with offloader:                                     # around the model's forward only
        output = model(tokens, positions, None, labels=labels)

How the tensors are found: a forward pre-hook on each chosen TransformerLayer records (weakly) the
``hidden_states`` it is called with, and a ``torch.autograd.graph.saved_tensors_hooks`` pack hook moves a
saved tensor only if it *is* one of those objects; every other saved tensor passes through untouched.

Copies: a CUDA tensor goes to pinned host memory on a side stream that first waits for the compute
stream; ``record_stream`` keeps its GPU block from reuse until the copy is done, and the unpack makes the
compute stream wait for the copy's event before copying back (non-blocking from pinned memory; the
host allocator holds the buffer until that copy is done). The copies do not overlap the backward's
compute ahead of time (no prefetch): each is paid when its layer is rebuilt. On a CPU-only machine
(the tests) the "host" copy is a plain copy to ``device``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch


@dataclass
class OffloadedTensor:
    """A saved tensor's host copy and where it came from."""

    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None  # the device-to-host copy's completion (CUDA sources only)


def to_host(
    tensor: torch.Tensor, device: torch.device, stream: torch.cuda.Stream | None = None
) -> OffloadedTensor:
    """A copy of ``tensor`` on ``device`` (same shape, strides, dtype); pinned and on ``stream`` for CUDA."""
    pinned = tensor.is_cuda and device.type == "cpu"
    host = torch.empty_strided(
        tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device, pin_memory=pinned
    )
    if not tensor.is_cuda:
        host.copy_(tensor)
        return OffloadedTensor(host, tensor.device, None)
    stream = stream or torch.cuda.current_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    tensor.record_stream(stream)  # its GPU memory is not reused before the copy has read it
    return OffloadedTensor(host, tensor.device, copied)


def from_host(saved: OffloadedTensor) -> torch.Tensor:
    """The tensor back on its device, ordered after the copy to host on the current stream."""
    if saved.copied is not None:
        torch.cuda.current_stream(saved.device).wait_event(saved.copied)
    host = saved.host
    out = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=saved.device)
    return out.copy_(host, non_blocking=host.is_pinned())


def checkpointed_layer_indices(config: Any, num_layers: int) -> list[int]:
    """Indices (in a model chunk of ``num_layers`` layers) of the layers whose input Megatron's full
    recompute saves: the first layer of each group of ``recompute_num_layers`` (uniform), or each of
    the first ``recompute_num_layers`` layers (block). Empty without full recompute."""
    if config.recompute_granularity != "full":
        return []
    if config.recompute_method == "uniform":
        return list(range(0, num_layers, config.recompute_num_layers))
    return list(range(min(config.recompute_num_layers, num_layers)))


class LayerInputOffloader:
    """Moves the saved inputs of ``layers`` (TransformerLayers) to ``device`` while used as a context.

    ``offloaded``: Megatron's layer numbers whose inputs went to ``device`` in the last forward, in
    order. Leaving the context after a forward with gradients raises if a chosen layer was called but
    its input was never saved (it was not recomputed, or a checkpoint saved it some other way), so a
    plan that counts on the offloading cannot silently run without it.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.offloaded: list[int] = []
        self._armed: list[list[Any]] = []  # [weakref to the input, layer number, OffloadedTensor | None]
        self._active = False
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._stream: torch.cuda.Stream | None = None
        self._handles = [
            layer.register_forward_pre_hook(partial(self._arm, layer.layer_number), with_kwargs=True)
            for layer in layers
        ]

    def _arm(self, layer_number: int, _module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self._active and isinstance(hidden, torch.Tensor):
            self._armed.append([weakref.ref(hidden), layer_number, None])

    def _pack(self, tensor: torch.Tensor) -> Any:
        for entry in self._armed:
            if entry[0]() is tensor:
                if entry[2] is None:  # the first save; a second one (another op) shares the host copy
                    entry[2] = to_host(tensor, self.device, self._copy_stream(tensor))
                    self.offloaded.append(entry[1])
                return entry[2]
        return tensor

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return from_host(saved) if isinstance(saved, OffloadedTensor) else saved

    def _copy_stream(self, tensor: torch.Tensor) -> torch.cuda.Stream | None:
        if not tensor.is_cuda:
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        return self._stream

    def __enter__(self) -> LayerInputOffloader:
        self.offloaded, self._armed, self._active = [], [], True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
        self._active, self._hooks = False, None
        missed = [number for _ref, number, saved in self._armed if saved is None]
        self._armed = []
        if exc_type is None and missed and torch.is_grad_enabled():
            raise RuntimeError(
                f"layer input offloading: the inputs of layers {missed} were never saved for backward; "
                "offloading needs those layers recomputed whole (model.recompute=full)"
            )

    def remove(self) -> None:
        """Unregister the layers' hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def layer_input_offloader(
    model: torch.nn.Module, k: int, device: str | torch.device = "cpu"
) -> LayerInputOffloader:
    """An offloader of the inputs of the first ``k`` checkpointed layers of ``model`` (a GPTModel chunk,
    unwrapped), with the model's recompute settings (:func:`checkpointed_layer_indices`)."""
    layers = model.decoder.layers
    chosen = checkpointed_layer_indices(model.config, len(layers))
    if not 0 < k <= len(chosen):
        raise ValueError(
            f"offloading {k} layer inputs: the model chunk saves {len(chosen)} checkpointed layer inputs "
            f"(recompute {model.config.recompute_granularity}, {model.config.recompute_method}, "
            f"{model.config.recompute_num_layers})"
        )
    return LayerInputOffloader([layers[i] for i in chosen[:k]], device)
