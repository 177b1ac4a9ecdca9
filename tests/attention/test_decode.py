"""The decode cache (attention/decode.py) against the float64 oracle: every call schedule, both paths.

Segments are short (w = 4 .. 30) so that a few dozen tokens cross many boundaries of every pattern;
ragged patterns (w not a multiple of r), GQA with irregular head groups, and head offsets included.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from longnet_megatron.attention import DilatedAttentionConfig, dilated_attention
from longnet_megatron.attention.decode import DilatedKVCache

from .cases import Case, random_case
from .oracle import multiplicity, oracle_attention

CASES = {
    # w = (4, 8, 16), r = (1, 2, 4): every pattern's segments end within 16 tokens.
    "geometric": Case(2, 50, 4, 4, 8, (4, 8, 16), (1, 2, 4), True),
    # GQA, 4 query heads per kv head: each stored kv head serves 2 (r = 2) or 1 (r = 4) query heads.
    "gqa4": Case(2, 45, 8, 2, 8, (4, 8, 16), (1, 2, 4), True),
    # Ragged (9 % 2, 22 % 7), 3 query heads per kv head: offset 0 of r = 2 reads kv heads (0, 0, 1).
    "ragged_gqa3": Case(1, 60, 6, 2, 8, (4, 9, 22), (1, 2, 7), True),
    # Global heads 12.. (tensor parallelism) with fewer heads than the largest rate.
    "head_offset": Case(1, 77, 8, 2, 8, (5, 12, 30), (1, 3, 6), True, head_offset=12),
    "w_equals_r": Case(1, 40, 4, 4, 4, (3, 9), (1, 9), True),
}


def schedule(kind: str, n: int, seed: int = 0) -> list[int]:
    """Call sizes that add up to n: one token at a time, a prefill then tokens, or random sizes."""
    if kind == "tokens":
        return [1] * n
    if kind == "prefill_then_tokens":
        return [n // 2] + [1] * (n - n // 2)
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(n - sum(sizes), rng.choice([1, 1, 2, 3, 5, 7, 13, 20])))
    return sizes


def run_cache(case: Case, sizes: list[int], max_decode_tokens: int, seed: int = 0):
    """Outputs of the cached calls (concatenated), the oracle's, the cache and the inputs."""
    q, k, v, _ = case.tensors(torch.float64, seed)
    cache = DilatedKVCache(
        case.config, case.heads, case.kv_heads, case.head_dim,
        head_offset=case.head_offset, max_decode_tokens=max_decode_tokens,
    )  # fmt: skip
    outs, t = [], 0
    for size in sizes:
        outs.append(cache.attend(q[:, t : t + size], k[:, t : t + size], v[:, t : t + size]))
        t += size
    expected = oracle_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, True, head_offset=case.head_offset
    )
    return torch.cat(outs, dim=1), expected, cache, (q, k, v)


@pytest.mark.parametrize("kind", ["tokens", "prefill_then_tokens", "random"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_calls_equal_the_oracle(name, kind):
    case = CASES[name]
    out, expected, _, _ = run_cache(case, schedule(kind, case.n), max_decode_tokens=4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("max_decode_tokens", [0, 1000])
def test_each_path_alone_is_exact(max_decode_tokens):
    # 0: every call takes the prefill path (dilated_attention + cached segment heads);
    # 1000: every call the decoding path, even a 20-token one.
    case = CASES["ragged_gqa3"]
    out, expected, _, _ = run_cache(case, schedule("random", case.n, seed=3), max_decode_tokens)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_decode_exactly(seed):
    case = dataclasses.replace(random_case(seed), causal=True, position_offset=0)
    out, expected, _, _ = run_cache(case, schedule("random", case.n, seed), max_decode_tokens=3, seed=seed)
    torch.testing.assert_close(out, expected)


def test_float32_decoding_matches_the_full_function():
    case = CASES["gqa4"]
    q, k, v, _ = case.tensors(torch.float32, 1)
    full = dilated_attention(q, k, v, case.config, backend="reference")
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim)
    sizes = schedule("prefill_then_tokens", case.n)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    out = torch.cat(
        [cache.attend(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n]) for s, n in zip(starts, sizes)], 1
    )
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_attended_keys_are_the_multiset_count_of_each_step():
    case = CASES["ragged_gqa3"]
    q, k, v, _ = case.tensors(torch.float64, 0)
    counts = multiplicity(case.n, case.heads, case.segment_lengths, case.dilation_rates, True)
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim, max_decode_tokens=2)
    t = 0
    for size in schedule("random", case.n, seed=5):
        cache.attend(q[:, t : t + size], k[:, t : t + size], v[:, t : t + size])
        assert cache.stats().attended_keys == int(counts[:, t : t + size].sum()), (t, size)
        t += size


def test_memory_is_bounded_by_one_segment_per_pattern():
    case = dataclasses.replace(CASES["geometric"], n=200)
    q, k, v, _ = case.tensors(torch.float64, 0)
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim)
    # Per query head: 4 + 8/2 + 16/4 keys. Storage: those 12 rows for every head, one spare row, rounded up
    # to a multiple of 8: 16 rows.
    assert cache.key_bound == 12
    seen_bytes = set()
    for t in range(case.n):
        cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        stats = cache.stats()
        seen_bytes.add(stats.bytes)
        held = (t % 4 + 1) * 4 + (t % 8 + 1) * 2 + (t % 16 + 1)  # keys x stored heads, per pattern
        assert stats.cached_keys == held
    assert seen_bytes == {2 * case.batch * case.heads * 16 * case.head_dim * 8}  # constant: never grows
    assert stats.dense_bytes == 2 * case.batch * case.n * case.kv_heads * case.head_dim * 8


def test_positions_beyond_max_positions_are_refused_and_long_patterns_are_capped():
    case = Case(1, 12, 4, 2, 8, (4, 64, 256), (1, 2, 4), True)
    q, k, v, _ = case.tensors(torch.float64, 0)
    expected = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, True)
    full = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim)
    capped = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim, max_positions=10)
    assert (full.rows, capped.rows) == (104, 16)  # 4 + 32 + 64 (+ 1 spare) rows, or 4 + 5 + 3 (+ 1)
    calls = [(0, 7), (7, 8), (8, 10)]  # each path: piecewise, one token, piecewise
    out = torch.cat([capped.attend(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in calls], 1)
    torch.testing.assert_close(out, expected[:, :10])
    with pytest.raises(ValueError, match="position limit 10"):
        capped.attend(q[:, 10:11], k[:, 10:11], v[:, 10:11])
    assert capped.length == 10


def test_crop_within_a_segment_and_across_one_while_recording():
    case = CASES["ragged_gqa3"]
    q, k, v, _ = case.tensors(torch.float64, 0)
    expected = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, True)
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim, max_decode_tokens=4)

    def attend(t0, t1):
        out = cache.attend(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1])
        torch.testing.assert_close(out, expected[:, t0:t1])

    attend(0, 21)
    attend(21, 22)
    cache.crop(-1)  # within every pattern's segment: no recording needed
    attend(21, 22)  # one token again: the single-token path's position follows the crop
    attend(22, 23)
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-3)  # position 19 is in an earlier w = 4 segment, which was dropped
    assert cache.length == 23
    cache.activate_past_recording()
    attend(23, 24)
    attend(24, 25)  # single tokens, the second starts a w = 4 segment
    cache.crop(-2)
    attend(23, 27)  # piecewise path, crosses 24
    cache.crop(-4)
    attend(23, 45)  # prefill path, crosses segments of every pattern
    cache.crop(-20)
    attend(25, 60)
    with pytest.raises(ValueError, match="minus the number"):
        cache.crop(2)


def test_batch_items_can_be_reordered_and_repeated():
    case = CASES["gqa4"]
    q, k, v, _ = case.tensors(torch.float64, 0)
    expected = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, True)
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim)
    cache.attend(q[:, :30], k[:, :30], v[:, :30])
    flip = torch.tensor([1, 0])
    cache.select_batch(flip)
    out = cache.attend(q[flip, 30:31], k[flip, 30:31], v[flip, 30:31])
    torch.testing.assert_close(out, expected[flip, 30:31])
    cache.select_batch(torch.tensor([1]))  # back to item 0 alone
    cache.repeat_batch(3)
    out = cache.attend(q[[0, 0, 0], 31:33], k[[0, 0, 0], 31:33], v[[0, 0, 0], 31:33])
    torch.testing.assert_close(out, expected[[0, 0, 0], 31:33])


def test_bad_inputs_are_clear_errors():
    config = DilatedAttentionConfig((4, 8), (1, 2))
    with pytest.raises(ValueError, match="for inference"):
        DilatedKVCache(config, 2, 2, 8).attend(
            *(torch.randn(1, 3, 2, 8, requires_grad=True) for _ in range(3))
        )
    with pytest.raises(ValueError, match="causal"):
        DilatedKVCache(DilatedAttentionConfig((4, 8), (1, 2), causal=False), 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of the GQA group"):
        DilatedKVCache(config, 4, 2, 8, head_offset=1)
    cache = DilatedKVCache(config, 4, 2, 8)
    x = torch.randn(2, 3, 4, 8)
    kv = torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match="2 key/value heads"):
        cache.attend(x, x, x)
    cache.attend(x, kv, kv)
    with pytest.raises(ValueError, match="batch 2"):
        cache.attend(x[:1], kv[:1], kv[:1])
    with pytest.raises(ValueError, match="float32"):
        cache.attend(x.double(), kv.double(), kv.double())
    with pytest.raises(ValueError, match="at least one"):
        cache.attend(x[:, :0], kv[:, :0], kv[:, :0])
    cache.reset()  # a reset cache takes any batch and dtype again
    cache.attend(x[:1].double(), kv[:1].double(), kv[:1].double())
    assert cache.length == 3


# ---------------------------------------------------------------- on a GPU (bf16, fused kernels)

GPU_CASES = {
    "geometric_d128": Case(1, 700, 16, 16, 128, (64, 128, 256), (1, 2, 4), True),
    "paper_ragged_gqa_d64": Case(2, 500, 12, 4, 64, (32, 64, 128, 256), (1, 2, 6, 12), True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_bf16_decoding_on_the_gpu_matches_the_oracle(name, backend):
    """A chunked prefill through a fused backend, then single tokens and a few at once, in bf16."""
    case = GPU_CASES[name]
    q, k, v, _ = case.tensors(torch.bfloat16, 0, device="cuda")
    expected = oracle_attention(
        *(t.double() for t in (q, k, v)), case.segment_lengths, case.dilation_rates, True
    )
    cache = DilatedKVCache(case.config, case.heads, case.kv_heads, case.head_dim)
    sizes = [200, 150] + [1] * 40 + [3, 5, 16, 1, 2] + [case.n - 417]
    outs, t = [], 0
    for size in sizes:
        outs.append(cache.attend(q[:, t : t + size], k[:, t : t + size], v[:, t : t + size], backend=backend))
        t += size
    out = torch.cat(outs, 1).double()
    error = ((out - expected).norm() / expected.norm()).item()
    assert error < 1e-2, error
