"""The context-parallel plan (pure index arithmetic) is consistent across ranks, checked without spawning.

For every rank of a layout, the plans must agree pairwise: a rank reads another's keys exactly when
that rank sends them, both compute the same message size, and the members of a segment hold exactly
the rows the selection rule gives the whole segment.
"""

from __future__ import annotations

import random

import pytest

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.attention.cp.plan import plan_context_parallel


def _plans(config, n, cp, heads=6, kv_heads=2, head_offset=0, base=0):
    return [
        plan_context_parallel(
            config,
            n,
            heads,
            kv_heads,
            head_offset=head_offset,
            position_offset=base + c * n,
            cp_rank=c,
            cp_size=cp,
        )
        for c in range(cp)
    ]


def _random_layout(seed):
    rng = random.Random(seed)
    ws = sorted(rng.sample(range(2, 120), rng.randint(1, 4)))
    rs = [rng.randint(1, min(w, 9)) for w in ws]
    rs[0] = 1
    causal = rng.random() < 0.5
    return (
        DilatedAttentionConfig(tuple(ws), tuple(rs), causal=causal),
        rng.randint(1, 40),
        rng.choice([2, 3, 4]),
    )


@pytest.mark.parametrize("seed", range(40))
def test_ranks_agree_on_who_sends_what(seed):
    config, n, cp = _random_layout(seed)
    plans = _plans(config, n, cp, head_offset=3 * (seed % 3), base=seed % 5)
    segments = {(c, s.pattern, s.segment): s for c, p in enumerate(plans) for s in p.crossing}
    for (c, pattern, segment), seg in segments.items():
        assert c in seg.members and len(seg.members) > 1
        for m in seg.sources:
            peer = segments[(m, pattern, segment)]
            assert c in peer.targets
            assert peer.message_numel(m, 2, 8) == seg.message_numel(m, 2, 8)
        for m in seg.targets:
            assert c in segments[(m, pattern, segment)].sources


@pytest.mark.parametrize("seed", range(40))
def test_members_hold_every_selected_row_of_the_segment(seed):
    config, n, cp = _random_layout(seed)
    base = seed % 5
    end = base + cp * n
    for seg in _plans(config, n, cp, base=base)[0].crossing + _plans(config, n, cp, base=base)[-1].crossing:
        w, r = config.patterns[seg.pattern]
        lo, hi = max(seg.segment * w, base), min((seg.segment + 1) * w, end)
        for off in seg.offsets:
            expected = sum(1 for p in range(lo, hi) if (p % w) % r == off.offset)
            assert sum(off.rows) == expected


def test_no_crossing_segments_when_every_segment_fits_in_a_chunk():
    config = DilatedAttentionConfig((8, 16, 32), (1, 2, 4))
    assert all(not p.crossing for p in _plans(config, 64, 4))


def test_causal_keys_only_travel_forward():
    config = DilatedAttentionConfig((8, 256), (1, 4), causal=True)
    for c, plan in enumerate(_plans(config, 32, 4)):
        (seg,) = plan.crossing
        assert seg.members == (0, 1, 2, 3)
        assert seg.sources == tuple(range(c)) and seg.targets == tuple(range(c + 1, 4))


def test_inconsistent_position_offset_is_an_error():
    with pytest.raises(ValueError, match="position_offset"):
        plan_context_parallel(
            DilatedAttentionConfig((8,), (1,)),
            16,
            2,
            2,
            head_offset=0,
            position_offset=3,
            cp_rank=1,
            cp_size=2,
        )
