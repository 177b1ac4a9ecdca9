"""The ``longnet-prep`` command line: tokenize, pack, inspect, merge. ``--help`` is the manual.

Importing it is cheap (no megatron, no torch): each command imports what it needs when it runs.
"""

from __future__ import annotations

import json
import os
import warnings

import click

from data_prep.inspect_dataset import dataset_summary, decode_sample, format_summary
from data_prep.merge import merge_datasets
from data_prep.pack import DEFAULT_SEQ_LENGTH, LONG_DOC_POLICIES, MAX_SEQ_LENGTH, TAIL_POLICIES, pack_datasets
from data_prep.readers import FORMATS
from data_prep.tokenize_corpus import ON_ERROR, tokenize_corpus
from data_prep.tokenizers import DEFAULT_TOKENIZER, ENCODERS

_overwrite = click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: refuse).")
_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def _choice(*decls: str, choices: tuple[str, ...], help: str):
    """An option taking one of ``choices``, the first by default."""
    return click.option(*decls, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


def _whole_number(*decls: str, low: int, high: int | None = None, help: str, **kwargs):
    """An integer option refused outside [low, high] (click's message names the option)."""
    kwargs.setdefault("show_default", "default" in kwargs)
    return click.option(*decls, type=click.IntRange(low, high), help=help, **kwargs)


def _output(help: str):
    return click.option("--output", "-o", required=True, help=help)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build Megatron datasets for LongNet pretraining from raw corpora.

    \b
    Typical run:
      longnet-prep tokenize corpus/ --pattern '*.jsonl.zst' -o data/corpus
      longnet-prep pack data/corpus -o data/packed --seq-length 1048576
      longnet-prep inspect data/packed_train --sample 0
    """
    # megatron warns about missing Transformer Engine / apex on import; irrelevant to data prep.
    warnings.filterwarnings("ignore", module="megatron")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_output("Output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json.")
@click.option(
    "--tokenizer",
    "-t",
    default=DEFAULT_TOKENIZER,
    show_default=True,
    help="A tiktoken encoding name (from tiktoken's cache / TIKTOKEN_CACHE_DIR), 'bytes', "
    "or a path to a .tiktoken rank file.",
)
@click.option(
    "--text-key", default="text", show_default=True, help="JSON field / Parquet column holding the text."
)
@_choice(
    "--format",
    "fmt",
    choices=FORMATS,
    help="Input format; auto: .jsonl/.json/.ndjson[.gz|.bz2|.xz|.zst] are JSON lines, .parquet is "
    "Parquet, anything else is one plain-text document per file.",
)
@click.option(
    "--pattern", "--glob", "pattern", help="File-name filter for directories and globs, e.g. '*.py'."
)
@_whole_number("--workers", "-j", low=1, default=os.cpu_count() or 1, help="Tokenizer processes.")
@_choice(
    "--on-error",
    choices=ON_ERROR,
    help="stop at the first bad record (naming file:line), or skip bad records and count them.",
)
@_choice(
    "--encoder",
    choices=ENCODERS,
    help="BPE library: auto uses quicktok where it reproduces the encoding exactly (cl100k), else "
    "tiktoken; the tokens are the same.",
)
@_overwrite
@_quiet
def tokenize(
    inputs, output, tokenizer, text_key, fmt, pattern, workers, on_error, encoder, overwrite, quiet
) -> None:
    """Tokenize INPUTS (files, directories, globs) into one Megatron indexed dataset.

    Each document becomes its tokens plus the end-of-document token. The output is the same for any
    number of workers and either encoder.
    """
    stats = tokenize_corpus(
        inputs,
        output,
        tokenizer=tokenizer,
        text_key=text_key,
        fmt=fmt,
        pattern=pattern,
        workers=workers,
        on_error=on_error,
        encoder=encoder,
        overwrite=overwrite,
        progress=not quiet,
    )
    rate = stats.input_bytes / max(stats.seconds, 1e-9) / 1e6
    click.echo(
        f"{output}: {stats.documents:,} documents, {stats.tokens:,} tokens from {stats.files:,} files "
        f"({stats.input_bytes / 1e6:,.1f} MB) in {stats.seconds:,.1f} s ({rate:,.2f} MB/s, {stats.encoder})"
    )


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_output("Output prefix: writes PREFIX_{train,valid,test}.* and PREFIX.pack.json.")
@_whole_number(
    "--seq-length",
    "-L",
    low=1,
    high=MAX_SEQ_LENGTH,
    default=DEFAULT_SEQ_LENGTH,
    help="L: sequences hold L+1 tokens.",
)
@_whole_number("--seed", low=0, default=1234, help="Seed of the document shuffle.")
@click.option(
    "--split",
    default="98,1,1",
    show_default=True,
    help="train,valid,test weights (documents): 1 to 3 finite, non-negative numbers with a positive sum.",
)
@_choice(
    "--tail",
    choices=TAIL_POLICIES,
    help="Last partial sequence of each split: drop its tokens, or pad it with end-of-document.",
)
@_choice(
    "--long-docs",
    choices=LONG_DOC_POLICIES,
    help="Documents longer than L+1 tokens: split over consecutive sequences, truncate to L+1, or drop.",
)
@_overwrite
@_quiet
def pack(inputs, output, seq_length, seed, split, tail, long_docs, overwrite, quiet) -> None:
    """Pack tokenized datasets INPUTS into shuffled sequences of L+1 tokens, split train/valid/test.

    Fails before writing anything when the train split would hold no sequence.
    """
    stats = pack_datasets(
        inputs,
        output,
        seq_length=seq_length,
        seed=seed,
        split=split,
        tail=tail,
        long_docs=long_docs,
        overwrite=overwrite,
        progress=not quiet,
    )
    for name, st in stats.items():
        click.echo(
            f"{output}_{name}: {st.sequences:,} sequences of {seq_length + 1:,} tokens from {st.documents:,} "
            f"documents; tail dropped {st.tail_tokens_dropped:,}, padded {st.pad_tokens:,}; "
            f"long documents {st.long_documents:,}"
        )
        if st.sequences == 0:
            click.echo(
                f"warning: {output}_{name} has no sequence ({st.tokens_in:,} tokens in {st.documents:,} "
                f"documents, fewer than L+1 = {seq_length + 1:,}); training cannot use this split",
                err=True,
            )


@main.command()
@click.argument("prefix")
@_whole_number("--sample", "-s", low=0, multiple=True, help="Decode sequence number N (repeatable).")
@_whole_number("--max-tokens", low=1, default=512, help="Decode at most this many tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def inspect(prefix, sample, max_tokens, as_json) -> None:
    """Counts, token-length histogram and decoded samples of the dataset at PREFIX."""
    summary = dataset_summary(prefix)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    for i in sample:
        click.echo("\n" + decode_sample(prefix, i, max_tokens))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_output("Output prefix.")
@_overwrite
def merge(inputs, output, overwrite) -> None:
    """Concatenate datasets (shards) INPUTS of one tokenizer into one dataset."""
    meta = merge_datasets(inputs, output, overwrite=overwrite)
    click.echo(f"{output}: merged {len(inputs)} datasets ({meta['stats']})")
