"""Random and hand-picked dilated attention cases shared by the attention tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from longnet_megatron.attention import DilatedAttentionConfig


@dataclass(frozen=True)
class Case:
    """One dilated attention problem: shapes, patterns and offsets."""

    batch: int
    n: int
    heads: int
    kv_heads: int
    head_dim: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool
    head_offset: int = 0
    position_offset: int = 0

    @property
    def config(self) -> DilatedAttentionConfig:
        return DilatedAttentionConfig(self.segment_lengths, self.dilation_rates, causal=self.causal)

    def tensors(self, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
        """Fresh random q, k, v and an output gradient, drawn in float64 then cast."""
        gen = torch.Generator().manual_seed(seed)
        shape_q = (self.batch, self.n, self.heads, self.head_dim)
        shape_kv = (self.batch, self.n, self.kv_heads, self.head_dim)
        q, dout = (torch.randn(shape_q, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(shape_kv, generator=gen, dtype=torch.float64) for _ in range(2))
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, dout))


def random_documents(batch: int, n: int, seed: int, rate: float = 0.08) -> torch.Tensor:
    """``[batch, n]`` ids of packed documents with random lengths (mean 1 / rate tokens; some single)."""
    gen = torch.Generator().manual_seed(seed)
    breaks = torch.rand(batch, n, generator=gen) < rate
    breaks[:, 0] = False
    return torch.cumsum(breaks.long(), dim=1) * 7 % 5  # ids repeat: documents are runs, not id classes


def random_case(seed: int) -> Case:
    """A random valid case: ragged patterns, GQA, offsets, short and long sequences."""
    rng = random.Random(seed)
    num_patterns = rng.randint(1, 4)
    ws = sorted(rng.sample(range(1, 48), num_patterns))
    rs = [rng.randint(1, min(w, 13)) for w in ws]
    rs[rng.randrange(num_patterns)] = 1
    kv_heads = rng.choice([1, 2, 3])
    group = rng.choice([1, 1, 2, 3])
    return Case(
        batch=rng.choice([1, 2]),
        n=rng.randint(1, 90),
        heads=kv_heads * group,
        kv_heads=kv_heads,
        head_dim=rng.choice([4, 8, 16]),
        segment_lengths=tuple(ws),
        dilation_rates=tuple(rs),
        causal=rng.random() < 0.6,
        head_offset=group * rng.choice([0, 0, 1, 3, 7]),
        position_offset=rng.choice([0, 0, rng.randint(1, 120)]),
    )


# Hand-picked cases named for what they exercise.
NAMED_CASES = {
    # The paper's shape scaled down 1/512: w = (4 .. 64), r = (1, 2, 4, 6, 12): ragged for r = 6, 12.
    "paper_ragged_causal": Case(1, 150, 12, 12, 8, (4, 8, 16, 32, 64), (1, 2, 4, 6, 12), True),
    "paper_ragged_noncausal": Case(2, 64, 6, 2, 8, (4, 8, 16, 32, 64), (1, 2, 4, 6, 12), False),
    "n_multiple_of_largest": Case(2, 96, 4, 4, 8, (8, 16, 32), (1, 2, 4), True),
    "n_shorter_than_segment": Case(1, 20, 4, 2, 8, (8, 64, 128), (1, 2, 4), True),
    "block_local_single_pattern": Case(2, 50, 3, 3, 8, (16,), (1,), False),
    "heads_not_multiple_of_r": Case(1, 70, 5, 5, 4, (6, 20), (1, 7), True),
    "gqa_offsets": Case(1, 77, 8, 2, 8, (5, 12, 30), (1, 3, 6), True, head_offset=12, position_offset=37),
    "w_equals_r": Case(1, 40, 4, 4, 4, (3, 9), (1, 9), True),
}
