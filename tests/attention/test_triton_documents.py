"""The per-call ``triton`` backend's variable-length path (document masking) in Triton's interpreter.

On CPU the kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at tiny
sizes in float16, as test_fused_triton.py does: single variable-length calls against the float64
reference (sequences inside one block, across blocks, one-row sequences, a block inside one
sequence taking the mask-free loops), and whole dilated attention with documents against the
oracle. On a GPU the same checks run with the real block sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

from longnet_megatron.attention import dilated_attention
from longnet_megatron.attention.backends.reference import ReferenceBackend

from .cases import Case, random_documents
from .oracle import oracle_attention

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 4e-3  # float16 inputs and outputs


@pytest.fixture(scope="module")
def backend():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: tests/conftest.py should have set it")
    from longnet_megatron.attention.backends.triton_kernel import TritonBackend

    return TritonBackend()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


# Sequence lengths of one variable-length call: within a block, across blocks, one-row sequences,
# and one long sequence (its interior blocks take the mask-free loops).
LENGTHS = {"mixed": [5, 1, 34, 1, 29], "one_row": [1, 1, 1, 3], "one_long": [96]}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(LENGTHS))
def test_varlen_call_matches_reference(name, causal, backend):
    lengths = LENGTHS[name]
    total, h, d = sum(lengths), 2, 16
    gen = torch.Generator().manual_seed(len(name))
    q, k, v, dout = (torch.randn(total, h, d, generator=gen, dtype=torch.float64) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    half = [t.to(DEVICE, torch.float16) for t in (q, k, v, dout)]
    cu_dev = cu.to(DEVICE)
    ref = ReferenceBackend()
    out, lse = backend.forward_varlen(*half[:3], cu_dev, max(lengths), causal=causal, scale=0.25)
    want_out, want_lse = ref.forward_varlen(q, k, v, cu, max(lengths), causal=causal, scale=0.25)
    assert out.shape == (total, h, d) and lse.shape == (h, total) and lse.dtype == torch.float32
    assert rel_err(out, want_out) < TOLERANCE
    assert (lse.double().cpu() - want_lse).abs().max().item() < 1e-2
    grads = backend.backward_varlen(
        half[3], *half[:3], out, lse, cu_dev, max(lengths), causal=causal, scale=0.25
    )
    want = ref.backward_varlen(dout, q, k, v, out.double().cpu(), lse.double().cpu(), cu, max(lengths),
                               causal=causal, scale=0.25)  # fmt: skip
    for name_, got, ref_grad in zip("qkv", grads, want):
        assert rel_err(got, ref_grad) < TOLERANCE, f"d{name_}"


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_attention_with_documents_matches_oracle(causal, backend):
    """GQA, head and position offsets, ragged patterns, documents crossing segments."""
    case = Case(1, 96, 4, 2, 16, (8, 32, 96), (1, 3, 4), causal, head_offset=2, position_offset=5)
    q, k, v, dout = case.tensors(torch.float64, seed=7)
    ids = random_documents(1, case.n, seed=7, rate=0.06)
    offsets = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    leaves = [t.to(DEVICE, torch.float16).requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*leaves, case.config, backend=backend, document_ids=ids.to(DEVICE), **offsets)
    grads = torch.autograd.grad(out, leaves, dout.to(DEVICE, torch.float16))
    ref_leaves = [t.to(torch.float16).double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(
        *ref_leaves, case.segment_lengths, case.dilation_rates, causal, document_ids=ids, **offsets
    )
    want = (ref, *torch.autograd.grad(ref, ref_leaves, dout.to(torch.float16).double()))
    for name, got, ref_t in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert rel_err(got, ref_t) < TOLERANCE, name
