"""The planned tasks select, per pattern, exactly the (position, head) pairs of docs/design.md's rule."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention.indexing import plan_tasks

from .cases import NAMED_CASES, random_case


def covered_pairs(case):
    """Per pattern: how many tasks select each (local position, local head) as a query."""
    counts = torch.zeros(len(case.segment_lengths), case.n, case.heads, dtype=torch.long)
    tasks = plan_tasks(
        case.config,
        case.n,
        case.heads,
        case.kv_heads,
        head_offset=case.head_offset,
        position_offset=case.position_offset,
    )
    for task in tasks:
        marker = torch.zeros(1, case.n, case.heads, dtype=torch.long)
        task.query.put(marker, torch.ones_like(task.query.gather(marker)))
        counts[task.pattern] += marker[0]
        # Keys are the same rows; kv heads are the query heads' groups.
        q_rows = task.query.gather(torch.arange(case.n).view(1, -1, 1).expand(1, case.n, case.heads))
        kv_rows = task.key_value.gather(torch.arange(case.n).view(1, -1, 1).expand(1, case.n, case.kv_heads))
        assert torch.equal(q_rows, kv_rows)
        q_heads = task.query.gather(torch.arange(case.heads).view(1, 1, -1).expand(1, case.n, case.heads))
        kv_heads = task.key_value.gather(
            torch.arange(case.kv_heads).view(1, 1, -1).expand(1, case.n, case.kv_heads)
        )
        assert torch.equal(q_heads // (case.heads // case.kv_heads), kv_heads)
    return counts


@pytest.mark.parametrize("seed", range(40))
def test_each_selected_pair_is_in_exactly_one_task(seed):
    case = random_case(seed)
    counts = covered_pairs(case)
    pos = torch.arange(case.n) + case.position_offset
    heads = torch.arange(case.heads) + case.head_offset
    for i, (w, r) in enumerate(zip(case.segment_lengths, case.dilation_rates)):
        expected = ((pos[:, None] % w) % r) == (heads[None, :] % r)
        assert torch.equal(counts[i], expected.long()), f"pattern {i} (w={w}, r={r}) of {case}"


def test_views_are_used_for_undilated_patterns():
    """r = 1 with a whole number of segments needs no copy: the gathered batch shares storage."""
    case = NAMED_CASES["n_multiple_of_largest"]
    q = torch.randn(1, case.n, case.heads, case.head_dim)
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads)
    undilated = [t for t in tasks if case.dilation_rates[t.pattern] == 1]
    assert undilated
    for task in undilated:
        assert task.query.gather(q).untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
