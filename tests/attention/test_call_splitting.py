"""Cutting large tasks into several kernel calls, or packing small ones into one, changes no result."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import DilatedAttentionConfig, function, packing
from longnet_megatron.attention.backends import ReferenceBackend
from longnet_megatron.attention.documents import Documents
from longnet_megatron.attention.function import dilated_backward, dilated_forward
from longnet_megatron.attention.indexing import plan_tasks, split_task

from .cases import NAMED_CASES, random_documents
from .oracle import oracle_attention


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


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_patterns_of_one_segment_length_share_one_call(kv_heads, causal, monkeypatch):
    """w_i / r_i equal for every pattern (the usual geometric set): one mixed call, one head per
    sequence, exact against the oracle and against one call per task, with and without documents."""
    monkeypatch.setattr(function, "_CALLS", {})
    config = DilatedAttentionConfig((8, 16, 32), (1, 2, 4), causal=causal)
    n, heads = 64, 4
    gen = torch.Generator().manual_seed(11)
    q, dout = (torch.randn(2, n, heads, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, n, kv_heads, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    tasks = plan_tasks(config, n, heads, kv_heads)
    calls = packing.kernel_calls(tasks, tuple(q.shape), kv_heads, q.device, function.MAX_CALL_ELEMENTS)
    assert len(calls) == 1 and calls[0].pattern == packing.MIXED
    assert calls[0].query.shape[2] == 1 and [p for p, _ in calls[0].parts] == [0, 1, 2]
    kw = {"causal": causal, "scale": 0.25}
    backend = ReferenceBackend()
    ids = random_documents(2, n, seed=5, rate=0.1)
    for documents in (None, Documents(ids)):
        whole = dilated_forward(q, k, v, tasks, backend, documents=documents, **kw)
        grads = dilated_backward(dout, q, k, v, *whole, tasks, backend, documents=documents, **kw)
        monkeypatch.setattr(packing, "PACK_BELOW", 0)
        monkeypatch.setattr(function, "_CALLS", {})
        single = dilated_forward(q, k, v, tasks, backend, documents=documents, **kw)
        single_grads = dilated_backward(dout, q, k, v, *single, tasks, backend, documents=documents, **kw)
        monkeypatch.undo()
        monkeypatch.setattr(function, "_CALLS", {})
        for got, want in zip((*whole, *grads), (*single, *single_grads)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(
        q64, k64, v64, config.segment_lengths, config.dilation_rates, causal, softmax_scale=0.25
    )
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    out, lse = dilated_forward(q, k, v, tasks, backend, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = dilated_backward(dout, q, k, v, out, lse, tasks, backend, **kw)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class _InPlaceReference(ReferenceBackend):
    """The reference backend with ``backward_into`` (as fa4 has it), counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.into_calls = 0

    def backward_into(self, dout, q, k, v, out, lse, grads, *, causal, scale):
        self.into_calls += 1
        for dst, grad in zip(grads, self.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)):
            dst.copy_(grad)


@pytest.mark.parametrize("name", ["paper_ragged_causal", "n_multiple_of_largest"])
def test_first_pattern_gradients_written_in_place_are_the_same(name, monkeypatch):
    monkeypatch.setattr(packing, "PACK_BELOW", 0)
    monkeypatch.setattr(function, "_CALLS", {})
    case = NAMED_CASES[name]
    q, k, v, dout = case.tensors(torch.float64, seed=4)
    tasks = plan_tasks(case.config, case.n, case.heads, case.heads)
    k, v = (t[:, :, :1].expand(-1, -1, case.heads, -1).contiguous() for t in (k, v))  # no GQA: written
    kw = {"causal": case.causal, "scale": 0.3}
    out, lse = dilated_forward(q, k, v, tasks, ReferenceBackend(), **kw)
    want = dilated_backward(dout, q, k, v, out, lse, tasks, ReferenceBackend(), **kw)
    backend = _InPlaceReference()
    got = dilated_backward(dout, q, k, v, out, lse, tasks, backend, **kw)
    assert backend.into_calls == sum(t.pattern == tasks[0].pattern for t in tasks) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


def test_a_first_pattern_packed_after_other_calls_is_merged_not_written(monkeypatch):
    """The first pattern's clipped last segment is small, packed with the second pattern's after the
    large calls: the first pattern may then not be written over (its rows were merged into already)."""
    config = DilatedAttentionConfig((8, 16), (1, 1), causal=True)
    n, heads = 100, 2
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, n, heads, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    tasks = plan_tasks(config, n, heads, heads)
    monkeypatch.setattr(packing, "PACK_BELOW", 8 * heads * 8 + 1)  # the 4-row partial blocks only
    monkeypatch.setattr(packing, "PACK_PLAN_BELOW", 0)
    monkeypatch.setattr(function, "_CALLS", {})
    calls = packing.kernel_calls(tasks, tuple(q.shape), heads, q.device, function.MAX_CALL_ELEMENTS)
    assert [c.pattern for c in calls] == [0, 1, packing.MIXED]
    assert not function._writes_first(tasks, [(c, None) for c in calls], q)
    kw = {"causal": True, "scale": 0.3}
    out, lse = dilated_forward(q, k, v, tasks, ReferenceBackend(), **kw)
    grads = dilated_backward(dout, q, k, v, out, lse, tasks, ReferenceBackend(), **kw)
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(q64, k64, v64, (8, 16), (1, 1), True, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(ref, (q64, k64, v64), dout)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_whole_plan_packing_off_keeps_short_plans_on_views_and_apart_in_the_cache(monkeypatch):
    """A short plan is packed whole by default; within ``whole_plan_packing(False)`` it is planned as a
    long one would be (here: no small tasks at all, so no packed call), and the remembered call lists
    of the two settings do not mix."""
    monkeypatch.setattr(function, "_CALLS", {})
    monkeypatch.setattr(packing, "PACK_BELOW", 1)  # nothing is small: only whole-plan packing packs
    case = NAMED_CASES["n_multiple_of_largest"]
    q, k, v, _ = case.tensors(torch.float64, seed=6)
    tasks = plan_tasks(case.config, case.n, case.heads, case.heads)
    default = function._calls(tasks, q, k, function.MAX_CALL_ELEMENTS)
    assert any(isinstance(c, packing.PackedTask) for c in default)
    with packing.whole_plan_packing(False):
        unpacked = function._calls(tasks, q, k, function.MAX_CALL_ELEMENTS)
        assert packing.PACK_PLAN_BELOW == 0
    assert not any(isinstance(c, packing.PackedTask) for c in unpacked)
    assert packing.PACK_PLAN_BELOW == 1 << 25  # restored
    assert function._calls(tasks, q, k, function.MAX_CALL_ELEMENTS) is default
    with packing.whole_plan_packing(True):
        assert function._calls(tasks, q, k, function.MAX_CALL_ELEMENTS) is default
    kw = {"causal": case.causal, "scale": 0.3}
    with packing.whole_plan_packing(False):
        out, lse = dilated_forward(q, k, v, tasks, ReferenceBackend(), **kw)
    want, _ = dilated_forward(q, k, v, tasks, ReferenceBackend(), **kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
