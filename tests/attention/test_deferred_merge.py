"""The deferred merge (one pass at the end, per-pattern buffers) against the online merge and the oracle.

Every layout the forward can meet: calls packed across patterns (short plans pack whole), one call per
task on views (packing off), views that cannot take B and segments as one dimension (B > 1 with the
segments cut into several calls), offsets and GQA, a backend that writes into the buffers
(``forward_into``); the Triton kernel (Triton's interpreter on CPU) against the PyTorch merge.
"""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import deferred, dilated_attention, function, packing
from longnet_megatron.attention.backends.reference import ReferenceBackend
from longnet_megatron.attention.deferred import DeferredMerge, deferred_layout, merge_fused, merge_torch
from longnet_megatron.attention.indexing import plan_tasks

from .cases import NAMED_CASES, Case, random_case
from .oracle import oracle_attention

DEFERRED_NAMED = ["gqa_offsets", "n_multiple_of_largest", "n_shorter_than_segment", "w_equals_r"]


def _fits(case: Case) -> bool:
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads, head_offset=case.head_offset,
                       position_offset=case.position_offset)  # fmt: skip
    return deferred_layout(tasks, (case.batch, case.n, case.heads, case.head_dim)) is not None


FITTING_RANDOM = [s for s in range(60) if _fits(random_case(s))][:16]


class IntoBackend(ReferenceBackend):
    """The reference kernel with ``forward_into``: checks that its targets are views of the buffers."""

    name = "reference-into"

    def __init__(self) -> None:
        super().__init__()
        self.buffers: list[torch.Tensor] = []
        self.calls = 0

    def forward_into(self, q, k, v, out, lse, *, causal, scale):  # noqa: D102
        o, l_ = self.forward(q, k, v, causal=causal, scale=scale)
        assert out.shape == o.shape and lse.shape == l_.shape
        assert lse.stride(-1) == 1, "the log-sum-exp view keeps the key length contiguous"
        assert any(_inside(t, buf) for buf in self.buffers for t in (out,)), "out is not a buffer view"
        out.copy_(o)
        lse.copy_(l_)
        self.calls += 1


def _inside(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    return start <= view.data_ptr() < start + size


def _forward(case: Case, q, k, v, backend, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    old = deferred.ENABLED
    deferred.ENABLED = enabled
    try:
        return dilated_attention(q, k, v, case.config, head_offset=case.head_offset,
                                 position_offset=case.position_offset, backend=backend, return_lse=True)  # fmt: skip
    finally:
        deferred.ENABLED = old


@pytest.fixture(params=["packed", "views"])
def call_layout(request, monkeypatch):
    """'packed': the default (short plans are packed whole); 'views': one call per task."""
    if request.param == "views":
        monkeypatch.setattr(packing, "PACK_BELOW", 0)
    return request.param


def _check(case: Case, seed: int, backend, device: str = "cpu") -> None:
    q, k, v, dout = case.tensors(torch.float32, seed, device)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = _forward(case, q, k, v, backend, enabled=True)
    online_out, online_lse = _forward(case, q.detach(), k.detach(), v.detach(), backend, enabled=False)
    torch.testing.assert_close(out, online_out, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse, online_lse, rtol=2e-6, atol=2e-6)
    assert lse.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(q64, k64, v64, case.segment_lengths, case.dilation_rates, case.causal,
                           head_offset=case.head_offset, position_offset=case.position_offset)  # fmt: skip
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e} for {case}"


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", DEFERRED_NAMED)
def test_named_cases_take_the_deferred_merge_and_match(name, call_layout):
    case = NAMED_CASES[name]
    assert _fits(case)
    _check(case, seed=7, backend="reference")


@pytest.mark.parametrize("seed", FITTING_RANDOM)
def test_random_cases_match_online_and_oracle(seed, call_layout):
    _check(random_case(seed), seed=500 + seed, backend="reference")


def test_enough_random_cases_fit():
    """The sweep above really holds deferred cases with offsets, GQA and batches of two."""
    cases = [random_case(s) for s in FITTING_RANDOM]
    assert len(cases) >= 12
    assert any(c.position_offset % max(c.dilation_rates) for c in cases)
    assert any(c.heads != c.kv_heads for c in cases) and any(c.batch == 2 for c in cases)


def test_ragged_patterns_keep_the_online_merge():
    case = NAMED_CASES["paper_ragged_causal"]  # r = 6, 12 do not divide w
    assert not _fits(case)


@pytest.mark.parametrize("batch", [1, 2])
def test_backend_writes_into_the_buffers(batch, monkeypatch):
    """With ``forward_into`` every call writes straight into its pattern's buffer (views), including
    calls cut along segments, which with B = 2 cannot be one view (they are copied instead)."""
    monkeypatch.setattr(packing, "PACK_BELOW", 0)
    monkeypatch.setattr(function, "MAX_CALL_ELEMENTS", 2 * 8 * 4)  # cut into calls of a few segments
    case = Case(batch, 96, 4, 2, 8, (8, 16, 32), (1, 2, 4), True, head_offset=2, position_offset=40)
    backend = IntoBackend()
    made = []
    real_init = DeferredMerge.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        backend.buffers[:] = [self.out, self.y]
        made.append(self)

    monkeypatch.setattr(DeferredMerge, "__init__", init)
    q, k, v, _ = case.tensors(torch.float32, 3)
    out, lse = function.dilated_forward(
        q, k, v, plan_tasks(case.config, 96, 4, 2, head_offset=2, position_offset=40), backend,
        causal=True, scale=8**-0.5, max_call_elements=2 * 8 * 4,
    )  # fmt: skip
    assert made and backend.calls > 0
    ref = oracle_attention(q.double(), k.double(), v.double(), case.segment_lengths, case.dilation_rates,
                           True, head_offset=2, position_offset=40)  # fmt: skip
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-5


def _random_state(case: Case, seed: int, device: str) -> tuple[DeferredMerge, list]:
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads, head_offset=case.head_offset,
                       position_offset=case.position_offset)  # fmt: skip
    layout = deferred_layout(tasks, (case.batch, case.n, case.heads, case.head_dim))
    gen = torch.Generator().manual_seed(seed)
    q = torch.empty(case.batch, case.n, case.heads, case.head_dim, device=device)
    state = DeferredMerge(layout, q, torch.float32)
    for t in (state.out, state.y):
        t.copy_(torch.randn(t.shape, generator=gen))
    for t in (state.base_lse, state.ly):
        t.copy_(torch.randn(t.shape, generator=gen))
    state.ly[::5] = float("-inf")  # some rows saw no key in a pattern
    return state, [p for p in layout.patterns.values() if not p.base]


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("name", ["gqa_offsets", "n_shorter_than_segment", "w_equals_r"])
def test_fused_kernel_matches_torch_merge(name, block, monkeypatch):
    """The Triton kernel (interpreter on CPU) against the PyTorch merge, same buffers; blocks of 16
    (position, head) rows cut them into several programs with a partial last one."""
    monkeypatch.setattr(deferred, "BLOCK_ROWS", block)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = NAMED_CASES[name]
    fused_state, others = _random_state(case, 11, device)
    torch_state, _ = _random_state(case, 11, device)
    lse_fused = torch.empty(case.batch, case.n, case.heads, device=device)
    lse_torch = torch.empty_like(lse_fused)
    merge_fused(fused_state, others, lse_fused)
    merge_torch(torch_state, others, lse_torch)
    torch.testing.assert_close(lse_fused, lse_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_state.out, torch_state.out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_offsets", "n_multiple_of_largest"])
def test_end_to_end_with_the_fused_kernel(name, call_layout, monkeypatch):
    """The whole function with the Triton merge (interpreter on CPU, compiled on CUDA) against the online
    merge and the oracle."""
    used = []

    def fused_on_cpu_too(out, lse):
        used.append(lse.dtype == torch.float32)
        return used[-1]

    monkeypatch.setattr(deferred, "_fused_applies", fused_on_cpu_too)
    _check(NAMED_CASES[name], seed=13, backend="reference", device=DEVICE)
    assert any(used)
