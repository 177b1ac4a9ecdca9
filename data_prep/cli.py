"""The ``longnet-prep`` command line: tokenize, pack, inspect, merge. ``--help`` is the manual."""

from __future__ import annotations

import json
import os
import warnings

import click

from data_prep.pack import DEFAULT_SEQ_LENGTH, LONG_DOC_POLICIES, TAIL_POLICIES
from data_prep.readers import FORMATS
from data_prep.tokenize_corpus import ON_ERROR
from data_prep.tokenizers import DEFAULT_TOKENIZER

_overwrite = click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: refuse).")
_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


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
@click.option(
    "--output", "-o", required=True, help="Output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json."
)
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
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Input format; auto: .jsonl/.json/.ndjson[.gz|.zst] are JSON lines, .parquet is Parquet, "
    "anything else is one plain-text document per file.",
)
@click.option(
    "--pattern", "--glob", "pattern", help="File-name filter for directories and globs, e.g. '*.py'."
)
@click.option(
    "--workers", "-j", type=int, default=os.cpu_count() or 1, show_default=True, help="Tokenizer processes."
)
@click.option(
    "--on-error",
    type=click.Choice(ON_ERROR),
    default="stop",
    show_default=True,
    help="stop at the first bad record (naming file:line), or skip bad records and count them.",
)
@_overwrite
@_quiet
def tokenize(inputs, output, tokenizer, text_key, fmt, pattern, workers, on_error, overwrite, quiet) -> None:
    """Tokenize INPUTS (files, directories, globs) into one Megatron indexed dataset.

    Each document becomes its tokens plus the end-of-document token. The output is the same for any
    number of workers.
    """
    from data_prep.tokenize_corpus import tokenize_corpus

    stats = tokenize_corpus(
        inputs,
        output,
        tokenizer=tokenizer,
        text_key=text_key,
        fmt=fmt,
        pattern=pattern,
        workers=workers,
        on_error=on_error,
        overwrite=overwrite,
        progress=not quiet,
    )
    rate = stats.input_bytes / max(stats.seconds, 1e-9) / 1e6
    click.echo(
        f"{output}: {stats.documents:,} documents, {stats.tokens:,} tokens from {stats.files:,} files "
        f"({stats.input_bytes / 1e6:,.1f} MB) in {stats.seconds:,.1f} s ({rate:,.2f} MB/s)"
    )


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--output",
    "-o",
    required=True,
    help="Output prefix: writes PREFIX_{train,valid,test}.* and PREFIX.pack.json.",
)
@click.option(
    "--seq-length",
    "-L",
    type=int,
    default=DEFAULT_SEQ_LENGTH,
    show_default=True,
    help="L: sequences hold L+1 tokens.",
)
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the document shuffle.")
@click.option("--split", default="98,1,1", show_default=True, help="train,valid,test weights (documents).")
@click.option(
    "--tail",
    type=click.Choice(TAIL_POLICIES),
    default="drop",
    show_default=True,
    help="Last partial sequence of each split: drop its tokens, or pad it with end-of-document.",
)
@click.option(
    "--long-docs",
    type=click.Choice(LONG_DOC_POLICIES),
    default="split",
    show_default=True,
    help="Documents longer than L+1 tokens: split over consecutive sequences, truncate to L+1, or drop.",
)
@_overwrite
@_quiet
def pack(inputs, output, seq_length, seed, split, tail, long_docs, overwrite, quiet) -> None:
    """Pack tokenized datasets INPUTS into shuffled sequences of L+1 tokens, split train/valid/test."""
    from data_prep.pack import pack_datasets

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
                f"warning: {output}_{name} has no sequence (too few tokens for L={seq_length})", err=True
            )


@main.command()
@click.argument("prefix")
@click.option("--sample", "-s", type=int, multiple=True, help="Decode sequence number N (repeatable).")
@click.option(
    "--max-tokens", type=int, default=512, show_default=True, help="Decode at most this many tokens."
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def inspect(prefix, sample, max_tokens, as_json) -> None:
    """Counts, token-length histogram and decoded samples of the dataset at PREFIX."""
    from data_prep.inspect_dataset import dataset_summary, decode_sample, format_summary

    summary = dataset_summary(prefix)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    for i in sample:
        click.echo("\n" + decode_sample(prefix, i, max_tokens))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Output prefix.")
@_overwrite
def merge(inputs, output, overwrite) -> None:
    """Concatenate datasets (shards) INPUTS of one tokenizer into one dataset."""
    from data_prep.merge import merge_datasets

    meta = merge_datasets(inputs, output, overwrite=overwrite)
    click.echo(f"{output}: merged {len(inputs)} datasets ({meta['stats']})")
