"""The ``triton`` backend's kernels, call by call, against the float64 reference backend; needs CUDA.

The whole dilated attention on the named cases (ragged segments, GQA, causal and not) against the
oracle runs in test_gpu_backends.py, whose backend list holds ``triton``. Here: single kernel calls on
strided views (read in place, no copies), causal square and non-causal rectangular shapes with lengths
that are not block multiples, head sizes 64 and 128, bf16 and fp16, a merged (out, lse) in the
backward that is not the call's own, and the clear refusals.
"""

from __future__ import annotations

import os

import pytest
import torch

from longnet_megatron.attention import (
    DilatedAttentionConfig,
    UnsupportedInputError,
    dilated_attention,
    get_backend,
)
from longnet_megatron.attention.backends.reference import ReferenceBackend

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (query length, key length, causal)
SHAPES = [
    (1, 1, True),
    (200, 200, True),
    (333, 333, True),
    (1024, 1024, True),
    (129, 300, False),
    (300, 77, False),
]


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    x, ref = x.double(), ref.double().to(x.device)
    return ((x - ref).norm() / ref.norm().clamp_min(floor * ref.numel() ** 0.5)).item()


def _backend():
    try:
        return get_backend("triton")
    except ImportError as err:
        pytest.skip(f"triton not importable here: {err}")


def _strided(batch: int, length: int, heads: int, d: int, dtype, gen, step: int, start: int) -> torch.Tensor:
    """``[batch, length, heads, d]`` as a strided view (rows ``start::step``, every other head)."""
    base = torch.randn(batch, length * step + start, 2 * heads, d, device="cuda", dtype=dtype, generator=gen)
    return base[:, start::step][:, :length, ::2]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("lq", "lk", "causal"), SHAPES)
def test_kernel_matches_reference(dtype, head_dim, lq, lk, causal):
    impl = _backend()
    gen = torch.Generator(device="cuda").manual_seed(lq * 7 + lk + head_dim)
    dt = DTYPES[dtype]
    q = _strided(3, lq, 4, head_dim, dt, gen, step=2, start=1)
    k = _strided(3, lk, 4, head_dim, dt, gen, step=3, start=0)
    v = _strided(3, lk, 4, head_dim, dt, gen, step=1, start=2)
    dout = _strided(3, lq, 4, head_dim, dt, gen, step=2, start=0)
    scale = head_dim**-0.5
    ref = ReferenceBackend()
    out, lse = impl.forward(q, k, v, causal=causal, scale=scale)
    want_out, want_lse = ref.forward(*(t.double() for t in (q, k, v)), causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dt
    assert lse.dtype == torch.float32 and lse.shape == (3, 4, lq)
    assert rel_err(out, want_out) < TOLERANCE
    assert (lse.double() - want_lse).abs().max().item() < 2e-2
    grads = impl.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    want = ref.backward(*(t.double() for t in (dout, q, k, v, out, lse)), causal=causal, scale=scale)
    for name, got, ref_grad, like in zip("qkv", grads, want, (q, k, v)):
        assert got.shape == like.shape and got.dtype == dt
        assert torch.isfinite(got).all()
        assert rel_err(got, ref_grad) < TOLERANCE, f"d{name}"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_backward_with_merged_out_and_lse(dtype):
    """Backward given another (merged) out and a larger lse, as the dilated merge passes them."""
    impl = _backend()
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout, other = (
        torch.randn(2, 257, 3, 128, device="cuda", dtype=dt, generator=gen) for _ in range(5)
    )
    out, lse = impl.forward(q, k, v, causal=True, scale=0.09)
    merged_lse = (lse + 0.7).transpose(1, 2).contiguous().transpose(1, 2)  # strided [b, h, l] view
    merged_out = (0.5 * out + 0.5 * other).transpose(0, 1).contiguous().transpose(0, 1)
    grads = impl.backward(dout, q, k, v, merged_out, merged_lse, causal=True, scale=0.09)
    ref = ReferenceBackend()
    want = ref.backward(
        *(t.double() for t in (dout, q, k, v, merged_out, merged_lse)), causal=True, scale=0.09
    )
    for got, ref_grad in zip(grads, want):
        assert rel_err(got, ref_grad) < TOLERANCE


def test_strided_inputs_are_read_in_place():
    """A forward on strided views allocates only its outputs (no gathered or contiguous copies)."""
    impl = _backend()
    gen = torch.Generator(device="cuda").manual_seed(5)
    base = torch.randn(4, 8192, 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = k = v = base[:, 1::4, ::2]  # 4 x 2048 rows x 8 heads, strided rows and heads
    impl.forward(q, k, v, causal=True, scale=0.1)  # compile outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = impl.forward(q, k, v, causal=True, scale=0.1)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    outputs = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    assert grown <= outputs + (1 << 20), f"forward allocated {grown} bytes for {outputs} bytes of outputs"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_dilated_attention_on_triton_matches_sdpa(dtype):
    """A longer GQA dilated attention (many segments per call) on triton and on sdpa agree."""
    impl = _backend()
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(1, 6000, 8, 128, device="cuda", dtype=dt, generator=gen, requires_grad=True)
    k, v = (
        torch.randn(1, 6000, 2, 128, device="cuda", dtype=dt, generator=gen, requires_grad=True) for _ in "kv"
    )
    dout = torch.randn(1, 6000, 8, 128, device="cuda", dtype=dt, generator=gen)
    cfg = DilatedAttentionConfig((512, 1024, 2048, 4096), (1, 2, 4, 6))  # ragged for r = 6
    results = []
    for backend in (impl, "sdpa"):
        out = dilated_attention(q, k, v, cfg, backend=backend, head_offset=4, position_offset=100)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results):  # two bf16/fp16 results, each within ~0.5% of the truth
        assert rel_err(got, want.float()) < 2 * TOLERANCE


@pytest.mark.parametrize(
    ("dtype", "head_dim", "message"),
    [
        (torch.float32, 128, "needs float16 or bfloat16"),
        (torch.bfloat16, 96, "head_dim in"),
        (torch.float16, 256, "head_dim in"),
    ],
)
def test_unsupported_inputs_fail_clearly(dtype, head_dim, message):
    impl = _backend()
    with pytest.raises(UnsupportedInputError, match=message):
        impl.check(torch.zeros(1, 64, 2, head_dim, device="cuda", dtype=dtype))


def test_refuses_cpu_tensors():
    impl = _backend()
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter takes CPU tensors")
    with pytest.raises(UnsupportedInputError, match="needs CUDA"):
        impl.check(torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16))
