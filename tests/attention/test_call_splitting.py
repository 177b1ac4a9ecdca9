"""Cutting large tasks into several kernel calls, or packing small ones into one, changes no result."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import function, packing
from longnet_megatron.attention.backends import ReferenceBackend
from longnet_megatron.attention.function import dilated_backward, dilated_forward
from longnet_megatron.attention.indexing import plan_tasks, split_task

from .cases import NAMED_CASES


@pytest.mark.parametrize("pack_below", [0, 1 << 30], ids=["unpacked", "packed"])
@pytest.mark.parametrize("name", ["paper_ragged_causal", "n_multiple_of_largest", "gqa_offsets"])
def test_split_calls_give_the_same_result(name, pack_below, monkeypatch):
    monkeypatch.setattr(packing, "PACK_BELOW", pack_below)
    monkeypatch.setattr(function, "_CALLS", {})
    case = NAMED_CASES[name]
    q, k, v, dout = case.tensors(torch.float64, seed=3)
    tasks = plan_tasks(
        case.config, case.n, case.heads, case.kv_heads, head_offset=case.head_offset,
        position_offset=case.position_offset,
    )  # fmt: skip
    kw = {"causal": case.causal, "scale": 0.3}
    backend = ReferenceBackend()
    whole = dilated_forward(q, k, v, tasks, backend, **kw)
    split = dilated_forward(q, k, v, tasks, backend, max_call_elements=1, **kw)
    for got, want in zip(split, whole):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    out, lse = whole
    grads = dilated_backward(dout, q, k, v, out, lse, tasks, backend, **kw)
    split_grads = dilated_backward(dout, q, k, v, out, lse, tasks, backend, max_call_elements=1, **kw)
    for got, want in zip(split_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_split_task_bounds_each_call():
    case = NAMED_CASES["n_multiple_of_largest"]
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads)
    for task in tasks:
        parts = split_task(
            task,
            2,
            case.heads,
            8,
            max_elements=2 * 8 * task.query.rows.length * task.query.num_heads(case.heads),
        )
        assert sum(p.query.rows.num_segments for p in parts) == task.query.rows.num_segments
        assert all(p.query.rows.num_segments == 1 for p in parts)
        marker = torch.zeros(2, case.n, case.heads)
        for p in parts:
            p.query.add(marker, torch.ones_like(p.query.gather(marker)))
        whole = torch.zeros_like(marker)
        task.query.add(whole, torch.ones_like(task.query.gather(whole)))
        assert torch.equal(marker, whole)
