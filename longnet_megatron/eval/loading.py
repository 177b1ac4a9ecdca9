"""MODEL on the command line -> a scorer: a run directory or checkpoint (Megatron, any TP / PP / CP
layout, under torchrun for more than one rank) or an exported Hugging Face-style folder (one process).

Options that change what is evaluated are recorded in the scorer's description, which goes into every
result: the dilated patterns (the model's, or ``--segment-lengths/--dilation-rates`` for evaluation
beyond the training length), the attention backend, dtype, device and layout.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.tokenizers import get_tokenizer
from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.checkpoint.files import find_checkpoint
from longnet_megatron.checkpoint.record import read_metadata
from longnet_megatron.checkpoint.weights import open_checkpoint
from longnet_megatron.eval.errors import EvalError
from longnet_megatron.eval.megatron_scorer import MegatronScorer
from longnet_megatron.eval.scoring import DEFAULT_CHUNK_TOKENS, BaseScorer, ModelShape, PlainScorer
from longnet_megatron.export.plain import CONFIG_FILE, LongNetArgs, LongNetForCausalLM
from longnet_megatron.export.tokenizer_files import load_tokenizer
from longnet_megatron.parallel.layout import ParallelLayout, initialize_megatron_parallel
from longnet_megatron.train.distributed import start_process_group, world_from_env

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelOptions:
    """How to load and run MODEL. dtype "auto": bfloat16 on CUDA, float32 on the CPU."""

    backend: str | None = None
    dtype: str = "auto"
    segment_lengths: tuple[int, ...] | None = None
    dilation_rates: tuple[int, ...] | None = None
    tokenizer: str | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    tp: int = 1
    pp: int = 1
    cp: int = 1


def load_scorer(path: str | os.PathLike, options: ModelOptions) -> BaseScorer:
    """The scorer of MODEL ``path``: an exported folder (it has ``config.json``) or a checkpoint."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return _load_export(path, options)
    return _load_checkpoint(path, options)


def _override(patterns: DilatedAttentionConfig, options: ModelOptions) -> DilatedAttentionConfig | None:
    """The ``--segment-lengths/--dilation-rates`` patterns (causality and scale kept), or None."""
    if options.segment_lengths is None and options.dilation_rates is None:
        return None
    if options.segment_lengths is None or options.dilation_rates is None:
        raise EvalError("--segment-lengths and --dilation-rates go together: give both")
    try:
        return DilatedAttentionConfig(
            options.segment_lengths, options.dilation_rates, patterns.causal, patterns.softmax_scale
        )
    except ValueError as e:
        raise EvalError(f"--segment-lengths/--dilation-rates: {e}") from None


def _patterns_summary(per_layer: list[dict[str, Any]]) -> list[list[int]] | list[list[list[int]]]:
    """``[[w, r], ...]`` when every layer has the same patterns, else one such list per layer."""
    pairs = [[list(p) for p in zip(d["segment_lengths"], d["dilation_rates"])] for d in per_layer]
    return pairs[0] if all(p == pairs[0] for p in pairs) else pairs


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _load_export(folder: Path, options: ModelOptions) -> PlainScorer:
    if options.tp * options.pp * options.cp != 1 or world_from_env().world_size != 1:
        raise EvalError(
            f"{folder} is an exported model: it runs in one process (no --tp/--pp/--cp, no torchrun); "
            "evaluate its Megatron checkpoint for parallel layouts"
        )
    try:
        args = LongNetArgs.from_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    tokenizer = load_tokenizer(folder, options.tokenizer)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    dtype = _dtype(options.dtype, device)
    model = LongNetForCausalLM.from_pretrained(
        folder, dtype=dtype, device=device, attention_backend=options.backend
    )
    patterns = _override(args.layer_patterns(0), options)
    if patterns is not None:
        for layer in model.model.layers:
            layer.self_attn.patterns = patterns
        args.dilated_attention = [patterns.to_dict()] * args.num_hidden_layers
    parameters = sum(p.numel() for p in model.parameters())
    description = {
        "path": str(folder),
        "kind": "export",
        "parameters": parameters,
        "trained_length": args.max_position_embeddings,
        "patterns": _patterns_summary(args.dilated_attention),
        "patterns_source": "override" if patterns is not None else "model",
        "attention_backend": args.attention_backend,
        "dtype": str(dtype).removeprefix("torch."),
        "device": _device_name(device),
        "layout": {"tp": 1, "pp": 1, "cp": 1},
        "tokenizer": tokenizer.describe(),
    }
    shape = ModelShape(
        hidden=args.hidden_size,
        ffn=args.intermediate_size,
        vocab=args.vocab_size,
        parameter_bytes=parameters * model.lm_head.weight.element_size(),
        dtype_bytes=model.lm_head.weight.element_size(),
    )
    return PlainScorer(
        model,
        tokenizer=tokenizer,
        description=description,
        shape=shape,
        device=device,
        chunk_tokens=options.chunk_tokens,
    )


def init_parallel(layout: ParallelLayout) -> torch.device:
    """torch.distributed (torchrun's ranks, or this one process) and Megatron's state for ``layout``."""
    world = world_from_env()
    ranks = layout.model_parallel_size()
    if world.world_size != ranks:
        raise EvalError(
            f"--tp {layout.tp} x --pp {layout.pp} x --cp {layout.cp} needs {ranks} processes, "
            f"{world.world_size} run: launch with torchrun --nproc-per-node {ranks} (one model replica)"
        )
    device = start_process_group(world, timeout_minutes=30)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        initialize_megatron_parallel(layout)
    current = ParallelLayout(
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )
    if current != layout:
        raise EvalError(f"Megatron is already initialised with {current}, not {layout}")
    return device


def _load_checkpoint(path: Path, options: ModelOptions) -> MegatronScorer:
    ckpt = find_checkpoint(path)
    record = copy.deepcopy(open_checkpoint(ckpt))
    spec = options.tokenizer if options.tokenizer is not None else record.get("tokenizer")
    if spec is None:
        raise EvalError(
            f"{ckpt}: the checkpoint records no tokenizer (trained on synthetic data?): pass --tokenizer SPEC"
        )
    tokenizer = get_tokenizer(spec)
    original = DilatedAttentionConfig.from_dict(record["preset"]["dilated_attention"])
    patterns = _override(original, options)
    if patterns is not None:
        record["preset"]["dilated_attention"] = patterns.to_dict()
        record["dilated_attention_per_layer"] = None
    layers = record["preset"]["num_layers"]
    per_layer = record.get("dilated_attention_per_layer") or [record["preset"]["dilated_attention"]] * layers
    layout = ParallelLayout(options.tp, options.pp, options.cp)
    device = init_parallel(layout)
    dtype = _dtype(options.dtype, device)
    description = {
        "path": str(path),
        "kind": "checkpoint",
        "checkpoint": str(ckpt),
        "step": read_metadata(ckpt).get("step"),
        "preset": record["preset"]["name"],
        "trained_length": record["preset"]["seq_length"],
        "patterns": _patterns_summary(per_layer),
        "patterns_source": "override" if patterns is not None else "model",
        "attention_backend": options.backend or record.get("attention_backend", "auto"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": _device_name(device),
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp},
        "tokenizer": tokenizer.describe(),
    }
    preset = record["preset"]
    hidden = preset["hidden_size"]
    shape = ModelShape(
        hidden=hidden,
        ffn=preset.get("ffn_hidden_size") or 4 * hidden,
        vocab=record["padded_vocab_size"],
        parameter_bytes=0,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        tp=layout.tp,
        cp=layout.cp,
    )
    scorer = MegatronScorer(
        ckpt,
        record,
        backend=options.backend,
        dtype=dtype,
        tokenizer=tokenizer,
        description=description,
        shape=shape,
        device=device,
        chunk_tokens=options.chunk_tokens,
        cp_size=layout.cp,
        is_main=dist.get_rank() == 0,
    )
    description["parameters"] = _count_parameters(scorer.inner, device)
    return scorer


def _count_parameters(model: torch.nn.Module, device: torch.device) -> int:
    """Parameters of the whole model: TP shards and pipeline stages added up, replicas and the last
    stage's copy of a tied embedding counted once."""
    from megatron.core import parallel_state as ps

    first_tp = ps.get_tensor_model_parallel_rank() == 0
    tied_copy = model.share_embeddings_and_output_weights and not ps.is_pipeline_first_stage()
    count = sum(
        p.numel()
        for name, p in model.named_parameters()
        if (getattr(p, "tensor_model_parallel", False) or first_tp)
        and not (tied_copy and name == "output_layer.weight")
    )
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return int(total.item())
