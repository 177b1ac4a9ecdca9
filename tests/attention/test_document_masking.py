"""Document masking (docs/design.md section 7) against the float64 oracle, forward and gradients.

The reference backend runs here (float64 and float32), with every way a kernel call can be split by
document: one variable-length call for a call that holds a boundary (a backend whose variable-length
path costs what its dense one does), dense runs of whole-document segments plus one variable-length
call (a slower variable-length path), with small calls packed or not. The documents are hard ones:
one-token documents, documents shorter than a dilation step, documents crossing segment boundaries,
ids that repeat (a document is a run of equal ids). The Triton kernels run the same checks in their
interpreter in test_triton_documents.py, sdpa and te on the GPU in test_gpu_backends.py, context
parallelism in cp/.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longnet_megatron.attention import (
    DilatedAttention,
    DilatedAttentionConfig,
    UnsupportedInputError,
    dilated_attention,
    documents,
    function,
    packing,
)
from longnet_megatron.attention.backends import ReferenceBackend, get_backend
from longnet_megatron.attention.documents import Documents, Varlen
from longnet_megatron.attention.indexing import AttentionTask, plan_tasks
from longnet_megatron.attention.packing import PackedTask

from .cases import NAMED_CASES, Case, random_case, random_documents
from .oracle import oracle_attention

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


class EvenCostReference(ReferenceBackend):
    """The reference kernel declaring a variable-length path as fast as its dense one (as triton's)."""

    name = "reference-even"
    varlen_cost = 1.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(case: Case, ids: torch.Tensor, dtype: torch.dtype, seed: int, backend=None) -> None:
    """Output and gradients of masked dilated attention vs the oracle."""
    backend = backend or ReferenceBackend()
    q, k, v, dout = case.tensors(dtype, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    offsets = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    out = dilated_attention(*leaves, case.config, backend=backend, document_ids=ids, **offsets)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(
        *ref_leaves, case.segment_lengths, case.dilation_rates, case.causal, document_ids=ids, **offsets
    )
    want = (ref, *torch.autograd.grad(ref, ref_leaves, dout.double()))
    for name, got, ref_t in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = rel_err(got, ref_t)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} for {case}"


@pytest.fixture(params=["varlen", "dense_runs", "dense_runs_unpacked"])
def splitting(request, monkeypatch):
    """How calls with a document boundary are split; returns the backend that gets that split."""
    monkeypatch.setattr(function, "_CALLS", {})
    if request.param == "varlen":
        return EvenCostReference()
    monkeypatch.setattr(documents, "DENSE_RUN_ELEMENTS", 1)  # every whole-document run stays dense
    if request.param == "dense_runs_unpacked":
        monkeypatch.setattr(packing, "PACK_BELOW", 0)
    return ReferenceBackend()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_oracle(seed, dtype, splitting):
    case = random_case(seed)
    rate = (0.04, 0.15, 0.5)[seed % 3]  # long documents, short ones, mostly one-token ones
    check(case, random_documents(case.batch, case.n, seed, rate), dtype, 100 + seed, splitting)


# Documents placed to hit each hard spot of the named cases.
def _runs(n: int, lengths: list[int]) -> torch.Tensor:
    """Ids of consecutive documents of the given lengths (the last one fills the rest)."""
    ids = torch.empty(n, dtype=torch.long)
    start = 0
    for i, length in enumerate([*lengths, n]):
        ids[start : start + length] = i
        start = min(n, start + length)
    return ids


HARD_DOCUMENTS = {
    # one-token documents, then a long one
    "one_token": ("paper_ragged_causal", lambda n: _runs(n, [1, 1, 1, 7, 1])),
    # documents shorter than the largest dilation step (12), so some select no row of a pattern
    "shorter_than_a_step": ("paper_ragged_noncausal", lambda n: _runs(n, [5, 3, 11, 2, 9])),
    # boundaries just before and after segment boundaries (w = 8, 16, 32)
    "across_segments": ("n_multiple_of_largest", lambda n: _runs(n, [7, 2, 8, 15, 34])),
    # GQA, global head and position offsets
    "gqa_offsets": ("gqa_offsets", lambda n: _runs(n, [10, 13, 1, 30])),
    # a sequence shorter than the segments, split once
    "short_sequence": ("n_shorter_than_segment", lambda n: _runs(n, [9])),
    # the same id again after another document: a new document (runs, not id classes)
    "repeated_ids": ("heads_not_multiple_of_r", lambda n: _runs(n, [20, 20, 30]) % 2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(HARD_DOCUMENTS))
def test_hard_documents_match_oracle(name, dtype, splitting):
    case_name, make = HARD_DOCUMENTS[name]
    case = NAMED_CASES[case_name]
    ids = make(case.n)[None].expand(case.batch, -1).clone()
    if case.batch > 1:
        ids[1] = make(case.n).flip(0)  # another layout in the second sequence
    for causal in (True, False):
        check(dataclasses.replace(case, causal=causal), ids, dtype, seed=len(name))


def test_one_document_equals_no_mask():
    """A batch that is one document takes the dense calls and gives exactly the unmasked result."""
    case = NAMED_CASES["paper_ragged_causal"]
    q, k, v, _ = case.tensors(torch.float64, seed=1)
    ids = torch.full((case.batch, case.n), 3)
    masked = dilated_attention(q, k, v, case.config, backend="reference", document_ids=ids)
    plain = dilated_attention(q, k, v, case.config, backend="reference")
    assert torch.equal(masked, plain)


def _calls(case: Case, ids: torch.Tensor, backend) -> list[tuple[object, Varlen | None]]:
    q = torch.zeros(case.batch, case.n, case.heads, case.head_dim)
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads)
    return Documents(ids).calls(function._calls(tasks, q, q[:, :, : case.kv_heads], 1 << 27), q,
                                case.kv_heads, backend)  # fmt: skip


def test_whole_document_segments_keep_dense_calls(monkeypatch):
    """Segments inside one document run dense (views); only segments holding a boundary go variable-length."""
    monkeypatch.setattr(documents, "DENSE_RUN_ELEMENTS", 1)
    monkeypatch.setattr(packing, "PACK_BELOW", 0)
    case = Case(1, 64, 2, 2, 4, (8,), (1,), True)  # one pattern: 8 segments of 8 rows
    ids = _runs(64, [20, 30])[None]  # boundaries at 20 (segment 2) and 50 (segment 6)
    calls = _calls(case, ids, ReferenceBackend())
    dense = [c for c, varlen in calls if varlen is None]
    assert all(isinstance(c, AttentionTask) for c in dense)
    assert [(c.query.rows.start, c.query.rows.num_segments) for c in dense] == [(0, 2), (24, 3), (56, 1)]
    (varlen_call, varlen), = [(c, v) for c, v in calls if v is not None]  # fmt: skip
    assert isinstance(varlen_call, PackedTask) and varlen_call.query.shape[0] == 2  # segments 2 and 6
    assert varlen.cu_seqlens.tolist() == [0, 4, 8, 10, 16] and varlen.max_seqlen == 8
    # A backend whose variable-length path is as fast as its dense one: one call, on the same view.
    (call, varlen), = _calls(case, ids, EvenCostReference())  # fmt: skip
    assert isinstance(call, AttentionTask) and call.query.rows.num_segments == 8
    assert varlen.cu_seqlens.tolist() == [0, 8, 16, 20, 24, 32, 40, 48, 50, 56, 64]


def test_calls_without_boundaries_are_unchanged():
    """Boundaries on multiples of every w: no segment holds one, so every call stays dense."""
    case = NAMED_CASES["n_multiple_of_largest"]  # n = 96, w = 8, 16, 32
    ids = _runs(case.n, [32, 32])[None].expand(case.batch, -1)
    calls = _calls(case, ids, ReferenceBackend())
    assert calls and all(varlen is None for _, varlen in calls)


def test_layouts_are_computed_once_per_batch(monkeypatch):
    """Every layer that shares a Documents reuses its layouts (forward and backward)."""
    case = NAMED_CASES["gqa_offsets"]
    q, k, v, dout = case.tensors(torch.float64, seed=2)
    docs = Documents(random_documents(case.batch, case.n, 0, 0.1))
    made = []
    split = documents._split_calls
    monkeypatch.setattr(documents, "_split_calls", lambda *a: made.append(1) or split(*a))
    for _ in range(3):  # three "layers"
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*leaves, case.config, backend="reference", document_ids=docs,
                                head_offset=case.head_offset, position_offset=case.position_offset)  # fmt: skip
        torch.autograd.grad(out, leaves, dout)
    assert len(made) == 1


def test_module_and_auto_backend():
    case = NAMED_CASES["paper_ragged_noncausal"]
    q, k, v, _ = case.tensors(torch.float64, seed=4)
    ids = random_documents(case.batch, case.n, 4, 0.1)
    got = DilatedAttention(case.config)(q, k, v, document_ids=ids)  # auto: the reference on CPU
    want = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, case.causal, document_ids=ids)
    assert rel_err(got, want) < 1e-10
    assert get_backend("auto", q, documents=True).name == "reference"


def test_bad_document_inputs_are_clear():
    cfg = DilatedAttentionConfig((8,), (1,))
    q = torch.zeros(2, 16, 2, 8)
    with pytest.raises(ValueError, match=r"document_ids must be \[batch, seq\] = \(2, 16\), got \(2, 15\)"):
        dilated_attention(q, q, q, cfg, document_ids=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        dilated_attention(q, q, q, cfg, document_ids=torch.zeros(2, 16))

    with pytest.raises(UnsupportedInputError, match="no variable-length path for document masking"):
        dilated_attention(
            q, q, q, cfg, backend=_WithoutVarlen(), document_ids=torch.zeros(2, 16, dtype=torch.int)
        )


class _WithoutVarlen:
    """A dense-only backend (the protocol's dense half)."""

    name = "dense-only"

    def __init__(self) -> None:
        self._ref = ReferenceBackend()

    def check(self, q):  # noqa: D102
        self._ref.check(q)

    def forward(self, *args, **kwargs):  # noqa: D102
        return self._ref.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):  # noqa: D102
        return self._ref.backward(*args, **kwargs)
