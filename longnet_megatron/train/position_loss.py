"""Loss by token position: log-spaced buckets, held-out packed sequences, the trainer's periodic check.

Does later text get easier? The token at position p of a sequence is predicted from p + 1 tokens of
context, so the mean loss in position buckets [0, 1), [1, 2), [2, 4), ..., [L/2, L) shows how much a
model gains from context. The buckets and sums here are shared by the trainer's ``eval`` section
(:class:`PositionEvaluator`, logged to TensorBoard and metrics.jsonl) and ``longnet-eval perplexity``.

Held-out sequences are read straight from a packed split (``<prefix>_<split>``, one packed sequence
of L+1 tokens per item, in stored order): the same first N sequences every time, whatever the
training data's shuffle.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.pipeline_parallel import get_forward_backward_func

from data_prep.errors import PrepError
from data_prep.megatron_config import read_pack_summary
from data_prep.pack import split_prefix
from longnet_megatron.parallel.batch import split_batch_for_context_parallel
from longnet_megatron.train.config.schema import ConfigError


def position_edges(length: int) -> list[int]:
    """Bucket edges ``[0, 1, 2, 4, ..., 2^k, length]``: bucket i holds positions [edges[i], edges[i+1])."""
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    edges = [0] + [1 << k for k in range(int(math.log2(length)) + 1) if (1 << k) < length]
    return edges + [length]


def bucket_label(low: int, high: int) -> str:
    """``'1K-2K'`` for the positions [1024, 2048) (binary K and M)."""
    return f"{_short(low)}-{_short(high)}"


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def bucket_sums(losses: torch.Tensor, positions: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """``[2, buckets]`` float64: summed loss and token count per position bucket.

    losses: ``[b, n]`` per-token losses; positions: ``[n]`` the global position of each column.
    """
    bounds = torch.tensor(edges[1:-1], device=positions.device, dtype=positions.dtype)
    index = torch.bucketize(positions, bounds, right=True)  # position p -> i with edges[i] <= p
    buckets = len(edges) - 1
    sums = torch.zeros(buckets, dtype=torch.float64, device=losses.device)
    sums.index_add_(0, index.to(losses.device), losses.double().sum(dim=0))
    counts = torch.bincount(index, minlength=buckets).to(sums) * losses.shape[0]
    return torch.stack((sums, counts))


def bucket_means(sums: torch.Tensor) -> list[float | None]:
    """Mean loss per bucket of :func:`bucket_sums` output (None where a bucket has no token)."""
    return [s / c if c > 0 else None for s, c in zip(*sums.double().tolist())]


class PackedSplit:
    """The packed sequences of ``<prefix>_<split>`` (L+1 tokens each) and the pack's summary.

    Raises :class:`~data_prep.errors.PrepError` naming the file when the prefix is not a pack output or
    the split holds no sequence.
    """

    def __init__(self, prefix: str, split: str = "valid") -> None:
        self.prefix, self.split = prefix, split
        self.summary = read_pack_summary(prefix, required_splits=(split,))
        self.seq_length = int(self.summary["seq_length"])
        self.tokenizer = self.summary["tokenizer"]
        self._dataset = IndexedDataset(split_prefix(prefix, split))

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence ``index``: L+1 token ids as int64."""
        return np.asarray(self._dataset[index], dtype=np.int64)


def same_tokenizer(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two ``Tokenizer.describe()`` dicts mean one tokenizer (rank files by content, not path)."""
    if a is None or b is None or a.get("kind") != b.get("kind"):
        return False
    if a["kind"] == "tiktoken_file":
        return a.get("sha256") == b.get("sha256") and a.get("pat_str") == b.get("pat_str")
    return a.get("name") == b.get("name")


def packed_split_for(
    prefix: str, split: str, seq_length: int, tokenizer: dict[str, Any] | None
) -> PackedSplit:
    """The ``eval`` section's data, checked against the model; a :class:`ConfigError` names ``eval.prefix``."""
    try:
        data = PackedSplit(prefix, split)
    except PrepError as e:
        raise ConfigError(f"eval.prefix={prefix}: {e.message}") from None
    if data.seq_length != seq_length:
        raise ConfigError(
            f"eval.prefix={prefix} is packed at L={data.seq_length}, the model trains at L={seq_length}: "
            f"pack it with --seq-length {seq_length}"
        )
    if tokenizer is not None and not same_tokenizer(data.tokenizer, tokenizer):
        raise ConfigError(
            f"eval.prefix={prefix} was tokenized with {data.tokenizer}, the training data with {tokenizer}"
        )
    return data


def _position_loss(positions: torch.Tensor, edges: list[int], output: torch.Tensor):
    sums = bucket_sums(output.detach().float(), positions, edges)
    return output.float().sum() * 0.0, {"position": sums}


class PositionEvaluator:
    """The trainer's ``eval`` section: loss by position on the first ``sequences`` of a packed split.

    Sequences are shared round-robin over data-parallel replicas (one per micro-batch); each context-
    parallel rank buckets its contiguous chunk by global position; the sums are all-reduced over the
    world. Returns a metrics record (``kind: "eval"``): the mean loss, perplexity, per-bucket losses
    as TensorBoard-friendly scalars ``loss_<low>-<high>`` and the bucket table.
    """

    def __init__(self, data: PackedSplit, sequences: int, seq_length: int) -> None:
        self.data, self.seq_length = data, seq_length
        self.count = min(sequences, len(data))
        self.edges = position_edges(seq_length)

    def evaluate(self, chunks: list[torch.nn.Module], device: torch.device) -> dict[str, Any]:
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        mine = list(range(dp_rank, self.count, dp))
        local = self.seq_length // cp
        positions = torch.arange(cp_rank * local, (cp_rank + 1) * local, device=device)
        total = torch.zeros(2, len(self.edges) - 1, dtype=torch.float64, device=device)

        def forward_step(iterator, model):
            seq = torch.from_numpy(self.data[next(iterator)])[None]
            batch = {
                "tokens": seq[:, :-1],
                "labels": seq[:, 1:],
                "position_ids": torch.arange(self.seq_length)[None],
            }
            batch = split_batch_for_context_parallel(batch, cp_rank, cp)
            batch = {k: v.to(device) for k, v in batch.items()}
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            return output, partial(_position_loss, positions, self.edges)

        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            if mine:
                reports = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=[iter(mine) for _ in chunks] if len(chunks) > 1 else iter(mine),
                    model=chunks if len(chunks) > 1 else chunks[0],
                    num_microbatches=len(mine),
                    seq_length=self.seq_length,
                    micro_batch_size=1,
                    forward_only=True,
                )
                if (
                    ps.is_pipeline_last_stage(ignore_virtual=True)
                    and ps.get_tensor_model_parallel_rank() == 0
                ):
                    for report in reports:
                        total += report["position"].to(total)
        for chunk in chunks:
            chunk.train()
        dist.all_reduce(total)
        return position_record(total.cpu(), self.edges, self.count)


def position_record(sums: torch.Tensor, edges: list[int], sequences: int) -> dict[str, Any]:
    """The metrics record of bucket sums: mean loss and perplexity, ``loss_<bucket>`` scalars, table."""
    loss = float(sums[0].sum() / sums[1].sum().clamp(min=1))
    means = bucket_means(sums)
    record: dict[str, Any] = {"loss": loss, "ppl": float(math.exp(min(loss, 50.0))), "sequences": sequences}
    for low, high, mean in zip(edges[:-1], edges[1:], means):
        if mean is not None:
            record[f"loss_{bucket_label(low, high)}"] = mean
    record["buckets"] = {"edges": edges, "loss": means, "tokens": [int(c) for c in sums[1].tolist()]}
    return record
