"""Model FLOPs: dilated attention counts only the (query, key) pairs its patterns select."""

from __future__ import annotations

from longnet_megatron.train.metrics import attention_pairs, training_flops_per_sequence


def brute_force_pairs(n: int, heads: int, patterns, causal: bool = True) -> int:
    total = 0
    for w, r in patterns:
        for h in range(heads):
            sel = [p for p in range(n) if (p % w) % r == h % r]
            for q in sel:
                total += sum(1 for k in sel if k // w == q // w and (k <= q or not causal))
    return total


def test_attention_pairs_match_brute_force_with_partial_segments():
    for n, heads, patterns in ((100, 4, [(16, 1), (32, 2), (64, 4)]), (70, 3, [(8, 1), (30, 4)])):
        for causal in (True, False):
            assert attention_pairs(n, heads, patterns, causal) == brute_force_pairs(
                n, heads, patterns, causal
            )


def test_dense_pattern_is_dense_causal_attention():
    n, heads = 1024, 8
    assert attention_pairs(n, heads, [(n, 1)]) == heads * n * (n + 1) // 2


def test_flops_are_six_n_d_plus_attention():
    kw = dict(
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        kv_heads=4,
        ffn_hidden_size=256,
        vocab_size=320,
        seq_length=256,
    )
    no_attention = training_flops_per_sequence(**kw, patterns=[])
    params = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 320  # matmul weights + the (tied) output layer
    assert no_attention == 6 * params * 256
    with_attention = training_flops_per_sequence(**kw, patterns=[(64, 1)])
    assert with_attention - no_attention == 3 * 2 * 4 * 16 * attention_pairs(256, 4, [(64, 1)])
