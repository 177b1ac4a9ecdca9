"""The ``longnet-eval`` command line (also ``python -m longnet_megatron.eval``). ``--help`` is the manual.

    longnet-eval perplexity MODEL --data PREFIX [--contexts 512,2K,32K] --out results/ppl
    longnet-eval passkey MODEL --lengths 1K,4K,32K --depths 0,0.5,1 --trials 5 --out results/passkey
    longnet-eval report LongNet=results/ppl.json dense=dense/ppl.json --out results/compare

MODEL: a training run directory, a checkpoints/ folder or one iter_* checkpoint (any saved layout; run
it with --tp/--pp/--cp under torchrun), or a folder exported by ``longnet-convert to-hf``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from data_prep.errors import PrepError
from data_prep.tokenizers import TokenizerError
from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.compat.warnings import quiet_third_party_warnings
from longnet_megatron.eval.errors import EvalError

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_length(text: str) -> int:
    """``'32K'`` -> 32768, ``'1M'`` -> 1048576, ``'1000'`` -> 1000 (binary K / M / G)."""
    text = text.strip().upper()
    factor = _UNITS.get(text[-1:], 1)
    digits = text[:-1] if factor > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise click.BadParameter(f"{text!r} is not a length like 4096, 32K or 1M")
    return int(digits) * factor


def _lengths(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    return [parse_length(v) for v in value.split(",") if v.strip()]


def _ints(ctx, param, value: str | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(_lengths(ctx, param, value))


def _floats(ctx, param, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like 0,0.5,1") from None


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input -> one line on rank 0 (no traceback), exit status 1; the process group is closed."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (EvalError, TokenizerError, FileNotFoundError) as e:
            message = str(e)
        except CheckpointError as e:
            message = f"{e.kind} checkpoint: {e}"
        except PrepError as e:
            message = e.message
        finally:
            _shutdown()
        if _is_main():
            raise click.ClickException(message)
        sys.exit(1)

    return wrapper


def _shutdown() -> None:
    import torch.distributed as dist

    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of how MODEL is loaded and run (shared by the evaluations)."""
    options = [
        click.argument("model", type=click.Path(exists=False)),
        click.option("--out", "-o", default=None, help="Output prefix: writes OUT.json, OUT.md, OUT.png."),
        click.option("--backend", default=None, help="Dilated attention backend (default: the model's)."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="auto: bfloat16 on CUDA, float32 on the CPU.",
        ),
        click.option(
            "--segment-lengths",
            callback=_ints,
            help="Dilated patterns w_i for evaluation (e.g. beyond the training length), with --dilation-rates.",
        ),
        click.option("--dilation-rates", callback=_ints, help="Dilation rates r_i, one per segment length."),
        click.option("--tokenizer", default=None, help="Tokenizer spec instead of the model's own."),
        click.option(
            "--chunk-tokens",
            type=click.IntRange(min=1),
            default=4096,
            show_default=True,
            help="Tokens per chunk of the output layer + loss (never the whole logits).",
        ),
        click.option(
            "--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor parallel."
        ),
        click.option(
            "--pp", type=click.IntRange(min=1), default=1, show_default=True, help="Pipeline parallel."
        ),
        click.option(
            "--cp", type=click.IntRange(min=1), default=1, show_default=True, help="Context parallel."
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _scorer(kwargs: dict[str, Any]):
    from longnet_megatron.eval.loading import ModelOptions, load_scorer

    names = (
        "backend",
        "dtype",
        "segment_lengths",
        "dilation_rates",
        "tokenizer",
        "chunk_tokens",
        "tp",
        "pp",
        "cp",
    )
    options = ModelOptions(**{k: kwargs.pop(k) for k in names})
    return load_scorer(kwargs.pop("model"), options)


def command_line(ctx: click.Context) -> str:
    """The command as given: ``longnet-eval SUBCOMMAND`` with the arguments and non-default options."""
    words = ["longnet-eval", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif param.is_flag:
            words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def _finish(result: dict[str, Any], out: str, summary: str) -> None:
    from longnet_megatron.eval.report import run_info, write_result

    if not _is_main():
        return
    result["run"] = run_info(command_line(click.get_current_context()))
    paths = write_result(result, out)
    click.echo(summary)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Evaluate a LongNet model's use of its context: perplexity by position and by context, passkey
    retrieval over distance. Results: JSON, a markdown table and a PNG plot. docs/evaluation.md."""
    quiet_third_party_warnings()


@main.command()
@model_options
@click.option("--data", required=True, help="Held-out data: an output prefix of `longnet-prep pack`.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="valid", show_default=True)
@click.option(
    "--sequences", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences scored."
)
@click.option(
    "--contexts",
    callback=_lengths,
    help="Evaluation contexts, each dividing the packed L (default L/64, L/32, ..., L), e.g. 512,4K,32K.",
)
@_one_line_errors
def perplexity(**kwargs: Any) -> None:
    """Loss of MODEL by token position and by evaluation context on held-out packed sequences: the same
    documents are cut into windows of each context and every window is scored on its own."""
    from longnet_megatron.eval.perplexity import evaluate_perplexity

    out, quiet = kwargs.pop("out") or "evaluation/perplexity", kwargs.pop("quiet")
    data, split, sequences, contexts = (kwargs.pop(k) for k in ("data", "split", "sequences", "contexts"))
    scorer = _scorer(kwargs)
    result = evaluate_perplexity(
        scorer, data, split=split, sequences=sequences, contexts=contexts, progress=not quiet
    )
    rows = result["contexts"]
    summary = ", ".join(f"{r['context']:,}: {r['loss']:.4f}" for r in rows)
    _finish(result, out, f"loss by context: {summary}")


@main.command()
@model_options
@click.option(
    "--lengths", callback=_lengths, required=True, help="Tokens the model reads, e.g. 1K,4K,32K,1M."
)
@click.option(
    "--depths", callback=_floats, default="0,0.25,0.5,0.75,1", show_default=True, help="Key depths, 0..1."
)
@click.option(
    "--trials", type=click.IntRange(min=1), default=5, show_default=True, help="Random keys per cell."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keys.")
@click.option(
    "--batch-tokens",
    callback=lambda ctx, param, value: parse_length(value),
    default="1M",
    show_default=True,
    help="Prompts of one length are batched up to this many tokens a forward pass.",
)
@_one_line_errors
def passkey(**kwargs: Any) -> None:
    """Passkey retrieval by MODEL: a random key hidden at each depth of filler text of each length, then
    asked for; scored by the key's log-probability and by greedy exact match."""
    from longnet_megatron.eval.passkey import evaluate_passkey

    out, quiet = kwargs.pop("out") or "evaluation/passkey", kwargs.pop("quiet")
    lengths, depths, trials, seed, batch = (
        kwargs.pop(k) for k in ("lengths", "depths", "trials", "seed", "batch_tokens")
    )
    scorer = _scorer(kwargs)
    result = evaluate_passkey(
        scorer, lengths, depths, trials=trials, seed=seed, batch_tokens=batch, progress=not quiet
    )
    accuracy = ", ".join(f"{n:,}: {sum(row) / len(row):.2f}" for n, row in zip(lengths, result["accuracy"]))
    _finish(result, out, f"passkey accuracy by length: {accuracy}")


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option(
    "--out", "-o", required=True, help="Output prefix: OUT.md, OUT_perplexity.png, OUT_passkey.png."
)
@click.option("--title", default=None, help="Heading of the markdown file.")
@_one_line_errors
def report(results: tuple[str, ...], out: str, title: str | None) -> None:
    """Tables and plots of several results side by side: RESULTS are NAME=RESULT.json."""
    from longnet_megatron.eval.report import load_results, write_report

    named = []
    for item in results:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"{item!r}: give results as NAME=RESULT.json")
        named.append((name, path))
    paths = write_report(load_results(named), out, title)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(main())
