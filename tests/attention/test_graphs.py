"""CUDA-graphed dilated attention (:mod:`longnet_megatron.attention.graphs`).

On the GPU: the replayed forward and backward against the eager function (the same kernels: equal to
float32 rounding of the kernels' own nondeterminism) and the float64 oracle, on fresh inputs at every
call (the graph copies them into its own), ragged patterns, GQA, offsets, causal and not; one call in
flight enforced. On the CPU: the eager path is taken, and the in-flight guard's logic.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from longnet_megatron.attention import GraphedDilatedAttention, dilated_attention

from .cases import NAMED_CASES
from .oracle import oracle_attention
from .test_gpu_backends import CASES, DTYPES, TOLERANCE, _backend_or_skip, _oracle, _seed, rel_err

GRAPH_BACKENDS = os.environ.get("LONGNET_TEST_BACKENDS", "fa4,sdpa-cudnn").split(",")
GRAPH_CASES = ["paper_ragged_d128", "gqa_noncausal_d64", "gqa_offsets", "geometric_partial_d128"]


def _module(case, backend, pack_whole_plan: bool = False):
    return GraphedDilatedAttention(case.config, backend, head_offset=case.head_offset,
                                   position_offset=case.position_offset, pack_whole_plan=pack_whole_plan)  # fmt: skip


def test_cpu_inputs_take_the_eager_function():
    """On CPU tensors the module is the eager function: same output and gradients."""
    case = NAMED_CASES["gqa_offsets"]
    q, k, v, dout = case.tensors(torch.float64, seed=3)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    graphed = _module(case, "reference")
    out = graphed(q, k, v)
    want = dilated_attention(q, k, v, case.config, backend="reference", head_offset=case.head_offset,
                             position_offset=case.position_offset)  # fmt: skip
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for got, expected in zip(grads, want_grads):
        assert torch.equal(got, expected)
    ref = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, case.causal,
                           head_offset=case.head_offset, position_offset=case.position_offset)  # fmt: skip
    torch.testing.assert_close(out, ref)
    assert graphed._graphs == {}


def test_in_flight_guard():
    """A pending call whose output is alive blocks the next forward; one whose output is gone does not."""
    graphed = _module(NAMED_CASES["gqa_offsets"], "reference")
    graphed._check_no_call_in_flight()  # nothing in flight
    alive = torch.zeros(1)
    graphed._pending, graphed._in_flight = True, __import__("weakref").ref(alive)
    with pytest.raises(RuntimeError, match="before the previous call's backward"):
        graphed._check_no_call_in_flight()
    del alive
    gc.collect()
    graphed._check_no_call_in_flight()
    assert not graphed._pending


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", GRAPH_CASES)
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("pack_whole_plan", [True, False], ids=["plan-packed", "plan-unpacked"])
def test_graphed_matches_eager_and_oracle(backend, name, dtype, pack_whole_plan):
    """Three calls on fresh inputs each: the replay equals the eager function (to the kernels' own
    run-to-run rounding) and the oracle; the first call's inputs are the oracle's. These short cases
    are packed whole by the eager function; graphed (by default unpacked) the captured calls are the
    long-sequence plan's."""
    case = CASES[name]
    graphed = _module(case, backend, pack_whole_plan)
    for call in range(3):
        seed = _seed(name, dtype) if call == 0 else 1000 + call
        q, k, v, dout = case.tensors(DTYPES[dtype], seed=seed, device="cuda")
        _backend_or_skip(backend, q)
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        out = graphed(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        eager = dilated_attention(q, k, v, case.config, backend=backend, head_offset=case.head_offset,
                                  position_offset=case.position_offset)  # fmt: skip
        eager_grads = torch.autograd.grad(eager, (q, k, v), dout)
        for tensor, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (eager, *eager_grads)):
            assert rel_err(got, want.double()) < 5e-3, (
                f"call {call}: {tensor} differs from the eager function"
            )
        if call == 0:
            for tensor, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), _oracle(name, dtype)):
                assert rel_err(got, want) < TOLERANCE, f"{tensor} against the oracle"
    assert len(graphed._graphs) == 1


@pytest.mark.gpu
def test_graphed_outputs_survive_the_next_call_and_one_call_in_flight():
    """An output stays valid after the next replay; a second forward before the first backward raises."""
    case = CASES["gqa_offsets"]
    graphed = _module(case, "sdpa-cudnn")
    q, k, v, dout = case.tensors(torch.bfloat16, seed=5, device="cuda")
    _backend_or_skip("sdpa-cudnn", q)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    first = graphed(q, k, v)
    kept = first.detach().clone()
    with pytest.raises(RuntimeError, match="before the previous call's backward"):
        graphed(q * 2, k, v)
    torch.autograd.grad(first, (q, k, v), dout)
    second = graphed(q.detach().mul(2).requires_grad_(True), k, v)
    assert torch.equal(first.detach(), kept)
    assert not torch.equal(second.detach(), kept)
    del second
    gc.collect()
    graphed(q, k, v)  # the dropped output leaves nothing in flight
    with torch.no_grad():  # without gradients: the eager function, no graph needed
        assert torch.equal(graphed(q, k, v), dilated_attention(
            q, k, v, case.config, backend="sdpa-cudnn", head_offset=case.head_offset,
            position_offset=case.position_offset))  # fmt: skip
