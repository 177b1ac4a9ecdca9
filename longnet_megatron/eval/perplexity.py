"""Perplexity by token position and by evaluation context on held-out packed sequences.

Each packed sequence of L tokens (plus its next-token labels) is cut into windows of c tokens for every
context c (default L/64, L/32, ..., L); each window is scored on its own, so the SAME tokens are
predicted with at most c tokens of context. Loss against c answers "does more context help"; loss by
position inside the window (log-spaced buckets, :func:`~longnet_megatron.train.position_loss.
position_edges`) answers "does later text get easier".
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm import tqdm

from data_prep.errors import PrepError
from longnet_megatron.eval.errors import EvalError
from longnet_megatron.eval.scoring import BaseScorer
from longnet_megatron.train.position_loss import (
    PackedSplit,
    bucket_means,
    bucket_sums,
    position_edges,
    same_tokenizer,
)

DEFAULT_SEQUENCES = 8
CONTEXT_DIVISIONS = 6  # contexts L / 2^6 .. L


def default_contexts(length: int, cp: int = 1) -> list[int]:
    """L/64, L/32, ..., L (those that are whole and split over ``cp`` ranks)."""
    found = [length >> k for k in range(CONTEXT_DIVISIONS, -1, -1) if length % (1 << k) == 0]
    return [c for c in found if c >= 1 and c % cp == 0]


def check_contexts(contexts: list[int], data: PackedSplit, cp: int) -> None:
    """Every context must divide the packed length (whole windows) and split over the CP ranks."""
    where = f"{data.prefix}.pack.json"
    for c in contexts:
        if c > data.seq_length:
            raise EvalError(
                f"--contexts {c}: longer than the data's packed length L={data.seq_length} ({where}); "
                "pack the held-out data longer"
            )
        if c < 1 or data.seq_length % c:
            raise EvalError(
                f"--contexts {c}: must divide the packed length L={data.seq_length} ({where}) so the same "
                "tokens are scored at every context"
            )
        if c % cp:
            raise EvalError(f"--contexts {c}: not divisible by the context-parallel size --cp {cp}")


def open_data(prefix: str, split: str, scorer: BaseScorer) -> PackedSplit:
    """The held-out split, checked to be of the model's tokenizer."""
    try:
        data = PackedSplit(prefix, split)
    except PrepError as e:
        raise EvalError(f"--data {prefix}: {e.message}") from None
    model_tokenizer = scorer.tokenizer.describe()
    if not same_tokenizer(data.tokenizer, model_tokenizer):
        raise EvalError(
            f"--data {prefix} was tokenized with {data.tokenizer} ({prefix}.pack.json), the model with "
            f"{model_tokenizer}: evaluate data prepared with the model's tokenizer"
        )
    return data


def evaluate_perplexity(
    scorer: BaseScorer,
    prefix: str,
    *,
    split: str = "valid",
    sequences: int = DEFAULT_SEQUENCES,
    contexts: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss by context and by position over the first ``sequences`` sequences of ``prefix``'s split."""
    data = open_data(prefix, split, scorer)
    length = data.seq_length
    contexts = sorted(set(contexts)) if contexts else default_contexts(length, scorer.cp_size)
    check_contexts(contexts, data, scorer.cp_size)
    if sequences < 1:
        raise EvalError(f"--sequences {sequences} must be >= 1")
    count = min(sequences, len(data))
    scorer.check_fits(length, f"--data {prefix} (L={length:,})")
    edges = position_edges(length)
    bar = tqdm(
        total=len(contexts) * count * length,
        desc="perplexity",
        unit="tok",
        unit_scale=True,
        disable=not (progress and scorer.is_main),
        smoothing=0.1,
    )
    rows = []
    for c in contexts:
        sums = torch.zeros(2, len(edges) - 1, dtype=torch.float64)
        scorer.reset_peak_memory()
        start = time.perf_counter()
        for i in range(count):
            seq = torch.from_numpy(data[i])
            tokens, labels = seq[:-1].view(length // c, c), seq[1:].view(length // c, c)
            sums += bucket_sums(scorer.score(tokens, labels).losses, torch.arange(c), edges)
            bar.set_postfix_str(f"context {c:,}", refresh=False)
            bar.update(length)
        scorer.synchronize()
        seconds = time.perf_counter() - start
        loss = float(sums[0].sum() / sums[1].sum())
        rows.append(
            {
                "context": c,
                "loss": loss,
                "ppl": math.exp(min(loss, 50.0)),
                "tokens": int(sums[1].sum()),
                "seconds": seconds,
                "tokens_per_s": count * length / seconds,
                "peak_memory_gib": scorer.peak_memory_gib(),
                "by_position": bucket_means(sums),
            }
        )
    bar.close()
    return {
        "kind": "perplexity",
        "model": scorer.description,
        "data": {"prefix": prefix, "split": split, "seq_length": length, "sequences": count},
        "edges": edges,
        "contexts": rows,
    }
