"""Training data: packed ``longnet-prep`` datasets through Megatron's GPTDataset and
BlendedMegatronDatasetBuilder (weighted blends), or synthetic random tokens for throughput runs; a
deterministic, resumable sampler; the per-rank context-parallel split.

Sample order. Step ``s`` reads global samples ``[s * gbs, (s + 1) * gbs)``; micro-batch ``m`` of that
step on data-parallel rank ``r`` reads ``mbs`` consecutive samples starting at
``s * gbs + m * mbs * dp + r * mbs`` (Megatron-LM's pretraining sampler). A run resumed at step ``s``
therefore sees exactly the samples the uninterrupted run would have, and every layout with the same
global batch sees the same samples per step. Tensor, pipeline and context-parallel ranks of one replica
read the same samples (memory-mapped, so that costs no copy); context-parallel ranks then keep their
contiguous chunk of the sequence.

Document masking (``data.document_masking``, docs/design.md section 7): samples carry
``document_ids`` from their end-of-document tokens, computed on the whole sequence before the
context-parallel split, so ids agree across ranks; ``data.reset_position_ids`` takes GPTDataset's own
positions restarting after each end-of-document token. :func:`packed_seq_params` hands both to the
model as Megatron's packed_seq_params.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset

from data_prep.megatron_config import gpt_dataset_config_for, model_inputs
from data_prep.pack import SPLITS, split_prefix
from longnet_megatron.attention.documents import document_bounds, document_ids_from_eod
from longnet_megatron.model.documents import DocumentMask, document_mask
from longnet_megatron.parallel.batch import split_batch_for_context_parallel
from longnet_megatron.train.config.schema import DataConfig
from longnet_megatron.train.job import ResolvedJob

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class SyntheticDataset(torch.utils.data.Dataset):
    """SYNTHETIC uniformly random tokens, for throughput measurements where no dataset is shipped.

    Sample ``i`` is a pure function of (seed, i), so synthetic runs resume and compare across layouts
    like real ones. Nothing can be learnt from it: the loss stays near ln(vocab). With
    ``document_length`` > 0 the tokens form documents of random lengths (uniform in [L/2, 3L/2] for
    mean L) each closed by the end-of-document token ``vocab_size - 1``, which no other token takes.
    """

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        seed: int,
        document_length: int = 0,
        reset_position_ids: bool = False,
    ) -> None:
        self.num_samples, self.seq_length, self.vocab_size, self.seed = (
            num_samples,
            seq_length,
            vocab_size,
            seed,
        )
        self.document_length, self.reset_position_ids = document_length, reset_position_ids

    @property
    def eod(self) -> int | None:
        """The end-of-document token of the documents (None without documents)."""
        return self.vocab_size - 1 if self.document_length else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        n = self.seq_length + 1
        if not self.document_length:
            text = torch.randint(0, self.vocab_size, (n,), generator=gen)
            return {
                "tokens": text[:-1],
                "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float),
                "position_ids": torch.arange(self.seq_length),
            }
        text = torch.randint(0, self.vocab_size - 1, (n,), generator=gen)
        half = max(1, self.document_length // 2)
        lengths = torch.randint(half, 3 * half + 1, (n // half + 1,), generator=gen)
        text[(lengths.cumsum(0) - 1)[lengths.cumsum(0) <= n]] = self.eod
        positions = torch.arange(n) - document_bounds(document_ids_from_eod(text[None], self.eod))[0][0]
        sample = {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float),
            "position_ids": positions[:-1] if self.reset_position_ids else torch.arange(self.seq_length),
        }
        return with_document_ids(sample, self.eod)


class _ModelInputs(torch.utils.data.Dataset):
    """GPTDataset samples of L+1 positions cut to the model's L (data_prep.megatron_config.model_inputs),
    with their ``document_ids`` when ``eod`` (the end-of-document token) is given."""

    def __init__(self, dataset: Any, eod: int | None = None) -> None:
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> Batch:
        sample = model_inputs(self.dataset[idx])
        return sample if self.eod is None else with_document_ids(sample, self.eod)


def with_document_ids(sample: Batch, eod: int) -> Batch:
    """``sample`` with ``document_ids`` ``[L]`` from its end-of-document tokens (each closes its
    document), over the whole sequence: under context parallelism the ids then agree across ranks."""
    return {**sample, "document_ids": document_ids_from_eod(sample["tokens"], eod)}


def packed_seq_params(batch: Batch, data: DataConfig, seq_length: int) -> DocumentMask | None:
    """Megatron's packed_seq_params of this rank's (CP-split) batch: its documents under
    ``data.document_masking``, its positions for RoPE under ``data.reset_position_ids``; else None."""
    if not (data.document_masking or data.reset_position_ids):
        return None
    return document_mask(
        seq_length,
        batch["document_ids"] if data.document_masking else None,
        batch["position_ids"] if data.reset_position_ids else None,
    )


def _gpt_dataset_config(resolved: ResolvedJob):
    """One GPTDatasetConfig for every prefix: per split, the blend of the prefixes' split datasets."""
    job = resolved.config
    configs = [
        gpt_dataset_config_for(
            prefix,
            seq_length=resolved.seq_length,
            random_seed=job.train.seed,
            path_to_cache=job.data.cache_dir,
            reset_position_ids=job.data.reset_position_ids,
            summary=summary,
        )
        for prefix, summary in zip(job.data.prefixes, resolved.pack_summaries)
    ]
    if len(configs) == 1:
        return configs[0]
    weights = job.data.weights or [1.0] * len(configs)
    blend_per_split = []
    for i, split in enumerate(SPLITS):
        present = [
            (split_prefix(p, split), w)
            for p, c, w in zip(job.data.prefixes, configs, weights)
            if c.blend_per_split[i] is not None and w > 0
        ]
        blend_per_split.append(([p for p, _ in present], [w for _, w in present]) if present else None)
    return dataclasses.replace(configs[0], blend_per_split=blend_per_split)


def build_datasets(
    resolved: ResolvedJob, num_train_samples: int, num_valid_samples: int
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(train, valid) datasets of at least the given numbers of samples (valid is None when absent)."""
    job, seq_length, vocab_size = resolved.config, resolved.seq_length, resolved.preset.vocab_size
    d = job.data
    if d.synthetic:
        log.warning("data: SYNTHETIC random tokens (data.synthetic=true): throughput only, nothing to learn")
        docs = {"document_length": d.synthetic_document_length, "reset_position_ids": d.reset_position_ids}
        return (
            SyntheticDataset(num_train_samples, seq_length, vocab_size, job.train.seed, **docs),
            SyntheticDataset(num_valid_samples, seq_length, vocab_size, job.train.seed + 1, **docs),
        )
    config = _gpt_dataset_config(resolved)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, 0], lambda: True, config
    ).build()
    eod = config.tokenizer.eod if d.document_masking else None
    return _ModelInputs(train, eod), (_ModelInputs(valid, eod) if valid is not None else None)


class ResumableBatchSampler:
    """Index lists of one data-parallel rank's micro-batches, from ``consumed_samples`` on (see module doc)."""

    def __init__(
        self, num_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        self.num_samples, self.consumed = num_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.num_samples:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.consumed) // (self.mbs * self.dp_size))


def micro_batches(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """An endless-enough iterator over this rank's micro-batches (collated, on the CPU)."""
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def split_for_context_parallel(batch: Batch, cp_rank: int, cp_size: int) -> Batch:
    """This context-parallel rank's contiguous chunk of every sequence in ``batch`` (global positions)."""
    return split_batch_for_context_parallel(batch, cp_rank, cp_size)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
