"""The fused triton kernel (all patterns in one pass) against the float64 oracle, forward and gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny sizes, in float16 (the
interpreter miscomputes bfloat16 dots); on a GPU the ``gpu``-marked tests run bf16 and fp16 at
thousands of tokens with the real block sizes. Both cover causal and not, ragged and partial
segments, tiles that span several segments, GQA, global head and position offsets, document masking
and Megatron's ``[s, b, h, d]`` layout read in place.
"""

from __future__ import annotations

import os

import pytest
import torch

from longnet_megatron.attention import DilatedAttentionConfig, UnsupportedInputError, dilated_attention
from longnet_megatron.attention.documents import document_bounds, document_ids_from_eod

from .cases import NAMED_CASES, Case, random_case, random_documents
from .oracle import oracle_attention, same_document

triton = pytest.importorskip("triton", reason="triton is not installed")
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def device() -> str:
    """``cuda``, or ``cpu`` where tests/conftest.py switched Triton to its interpreter."""
    if ON_GPU:
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: tests/conftest.py should have set it")
    return "cpu"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double().to(x.device)
    return ((x - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def check_against_oracle(
    case: Case, dtype: torch.dtype, device: str, seed: int, tol: float, documents: float = 0.0, sbhd=False
):
    """Fused triton vs oracle; ``documents`` > 0 masks documents of mean length 1 / documents."""
    q, k, v, dout = case.tensors(torch.float64, seed)
    doc = random_documents(case.batch, case.n, seed, documents) if documents else None
    leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(
        *leaves,
        case.segment_lengths,
        case.dilation_rates,
        case.causal,
        head_offset=case.head_offset,
        position_offset=case.position_offset,
        document_ids=doc,
    )
    want = (ref, *torch.autograd.grad(ref, leaves, dout.to(dtype).double()))
    if sbhd:  # Megatron's [s, b, h, d], read in place through transposed views
        inputs = [
            t.to(device=device, dtype=dtype).transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)
        ]
        views = [t.transpose(0, 1) for t in inputs]
    else:
        inputs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        views = inputs
    out = dilated_attention(
        *views,
        case.config,
        backend="triton-fused",
        head_offset=case.head_offset,
        position_offset=case.position_offset,
        document_ids=None if doc is None else doc.to(device),
    )
    got_dout = dout.to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, got_dout)
    if sbhd:
        grads = [g.transpose(0, 1) for g in grads]
    for name, got, ref_t in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert got.dtype == dtype and got.shape == ref_t.shape
        assert torch.isfinite(got).all(), name
        err = rel_err(got, ref_t)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def _small(case: Case, **changes) -> Case:
    """The case with a head size the kernel takes (16) and any other field changed."""
    fields = {**case.__dict__, "head_dim": 16, **changes}
    return Case(**fields)


INTERPRETER_CASES = {
    "paper_ragged_causal": _small(NAMED_CASES["paper_ragged_causal"], n=70, heads=6, kv_heads=6),
    "paper_ragged_noncausal": _small(NAMED_CASES["paper_ragged_noncausal"], batch=1),
    "gqa_offsets": _small(NAMED_CASES["gqa_offsets"]),
    "n_shorter_than_segment": _small(NAMED_CASES["n_shorter_than_segment"]),
    "heads_not_multiple_of_r": _small(NAMED_CASES["heads_not_multiple_of_r"], heads=3, kv_heads=3),
    "segments_longer_than_tiles": Case(
        1, 100, 4, 2, 32, (40, 80), (1, 3), True, head_offset=2, position_offset=9
    ),
}


@pytest.mark.parametrize("name", sorted(INTERPRETER_CASES))
def test_named_cases_match_oracle(name, device):
    case = INTERPRETER_CASES[name]
    if ON_GPU:
        pytest.skip("interpreter-sized case; the GPU runs test_gpu_*")
    check_against_oracle(case, torch.float16, device, seed=len(name), tol=4e-3)


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_match_oracle(seed, device):
    if ON_GPU:
        pytest.skip("interpreter-sized case; the GPU runs test_gpu_*")
    case = _small(random_case(1000 + seed), heads=2, batch=1)
    case = _small(case, kv_heads=case.kv_heads if 2 % case.kv_heads == 0 else 1)
    check_against_oracle(case, torch.float16, device, seed=seed, tol=4e-3)


@pytest.mark.parametrize("rate", [0.08, 0.015], ids=["short_docs", "long_docs"])
@pytest.mark.parametrize("causal", [True, False])
def test_document_masking_matches_oracle(causal, rate, device):
    """Short documents mask inside blocks; long ones also take the skip and the mask-free paths."""
    if ON_GPU:
        pytest.skip("interpreter-sized case; the GPU runs test_gpu_*")
    case = Case(1, 160, 4, 2, 16, (8, 32, 128), (1, 2, 4), causal, head_offset=2, position_offset=5)
    check_against_oracle(case, torch.float16, device, seed=3, tol=4e-3, documents=rate)


def test_megatron_layout_read_in_place(device):
    if ON_GPU:
        pytest.skip("interpreter-sized case; the GPU runs test_gpu_*")
    case = Case(2, 48, 2, 1, 16, (8, 24), (1, 2), True, head_offset=1)
    check_against_oracle(case, torch.float16, device, seed=5, tol=4e-3, sbhd=True)


def test_oracle_document_mask_is_attention_per_document():
    """The oracle's document masking equals dense attention run on each document alone."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 30, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ids = torch.tensor([[4] * 7 + [1] * 12 + [4] * 11])  # three documents; ids repeat across them
    out = oracle_attention(q, k, v, (64,), (1,), True, document_ids=ids)
    for lo, hi in ((0, 7), (7, 19), (19, 30)):
        part = oracle_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], (64,), (1,), True)
        torch.testing.assert_close(out[:, lo:hi], part, rtol=1e-12, atol=1e-12)
    assert same_document(ids[0])[6, 7].item() is False


def test_fused_kernel_refuses_float32():
    q = torch.zeros(1, 16, 2, 16)
    cfg = DilatedAttentionConfig((8,), (1,))
    with pytest.raises(UnsupportedInputError, match="fused triton kernel"):
        dilated_attention(q, q, q, cfg, backend="triton-fused")  # float32


def test_document_ids_from_eod():
    tokens = torch.tensor([[5, 0, 3, 3, 0, 7, 8]])
    ids = document_ids_from_eod(tokens, eod_token=0)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 2]]  # the end-of-document token closes its document
    start, end = document_bounds(ids, position_offset=10)
    assert start.tolist() == [[10, 10, 12, 12, 12, 15, 15]]
    assert end.tolist() == [[12, 12, 15, 15, 15, 17, 17]]


# --------------------------------------------------------------------------------------------------
# GPU: real block sizes, thousands of tokens, bf16 and fp16
# --------------------------------------------------------------------------------------------------
GPU_CASES = {
    "geometric_causal": Case(1, 4100, 8, 8, 128, (256, 512, 1024, 2048, 4096), (1, 2, 4, 8, 16), True),
    "paper_ragged_gqa_offsets": Case(
        2,
        3000,
        8,
        2,
        64,
        (256, 512, 1024, 2048, 4096),
        (1, 2, 4, 6, 12),
        True,
        head_offset=8,
        position_offset=300,
    ),
    "noncausal_partial": Case(1, 2500, 4, 4, 128, (384, 1000, 3000), (1, 3, 5), False, head_offset=3),
    "small_segments": Case(1, 1000, 4, 2, 64, (16, 100), (1, 4), True, position_offset=7),
}
GPU_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_gpu_cases_match_oracle(name, dtype, device):
    check_against_oracle(GPU_CASES[name], dtype, device, seed=len(name), tol=GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rate", [0.08, 0.001], ids=["short_docs", "long_docs"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_document_masking(causal, rate, dtype, device):
    case = Case(2, 3000, 4, 2, 128, (256, 1024, 4096), (1, 4, 16), causal, position_offset=64)
    check_against_oracle(case, dtype, device, seed=9, tol=GPU_TOL[dtype], documents=rate)


@pytest.mark.gpu
def test_gpu_megatron_layout(device):
    case = Case(2, 2048, 8, 4, 128, (256, 1024), (1, 4), True, head_offset=8)
    check_against_oracle(case, torch.bfloat16, device, seed=2, tol=GPU_TOL[torch.bfloat16], sbhd=True)


@pytest.mark.gpu
def test_gpu_allocates_only_outputs(device):
    """Forward allocates out and lse; backward dq, dk, dv and a float32 [B, H, N] delta: no copies."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, n, h, d = 1, 65536, 8, 128
    q, k, v, dout = (
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_()
    cfg = DilatedAttentionConfig.geometric(2048, 5)
    out = dilated_attention(q, k, v, cfg, backend="triton-fused")  # compile and tune outside the measurement
    torch.autograd.grad(out, (q, k, v), dout)
    del out
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = dilated_attention(q, k, v, cfg, backend="triton-fused")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    elem = b * n * h * d * 2
    expected = 4 * elem + b * n * h * 4 + b * h * n * 4  # out, dq, dk, dv; lse; delta
    assert grown <= expected + (8 << 20), f"fwd+bwd grew {grown} bytes; outputs are {expected}"
    assert all(torch.isfinite(g).all() for g in grads)
