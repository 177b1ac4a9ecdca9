"""Fused GPU backends (te, sdpa and each of its kernels) against the float64 oracle; needs CUDA.

bf16 and fp16, forward and gradients, relative error under 1e-2, on the named cases (ragged dilated
segments, partial last segments, GQA, global offsets) with realistic head sizes, plus longer cases
whose calls are large batches. Also the automatic choice and the clear errors. Setting
``LONGNET_GPU_RESULTS=path.json`` writes the largest error per backend, dtype and tensor there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import pytest
import torch

from longnet_megatron.attention import UnsupportedInputError, dilated_attention, get_backend
from longnet_megatron.attention.backends.reference import ReferenceBackend
from longnet_megatron.attention.indexing import plan_tasks

from .cases import NAMED_CASES, Case
from .oracle import oracle_attention

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2
# LONGNET_TEST_BACKENDS=te,sdpa-flash restricts the run (one process per backend isolates a crash).
BACKENDS = os.environ.get(
    "LONGNET_TEST_BACKENDS", "te,sdpa,sdpa-cudnn,sdpa-flash,sdpa-efficient,triton"
).split(",")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The named cases with kernel-sized heads, and longer ones (batches of many segments).
CASES = {name: dataclasses.replace(case, head_dim=64) for name, case in NAMED_CASES.items()}
CASES["paper_ragged_d128"] = Case(1, 1100, 12, 12, 128, (64, 128, 256, 512, 1024), (1, 2, 4, 6, 12), True)
CASES["geometric_partial_d128"] = Case(2, 1000, 16, 16, 128, (128, 256, 512), (1, 2, 4), True)
CASES["gqa_noncausal_d64"] = Case(
    1, 700, 8, 2, 64, (100, 300), (1, 3), False, head_offset=8, position_offset=5
)

WORST: dict[str, float] = {}


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-300) -> float:
    """||x - ref|| / ||ref||; ``floor`` (per element, RMS) keeps an all-zero reference meaningful."""
    ref = ref.cpu()
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(floor * ref.numel() ** 0.5)).item()


def _backend_or_skip(name: str, q: torch.Tensor):
    try:
        return get_backend(name, q)
    except ImportError as err:
        pytest.skip(f"{name} not importable here: {err}")
    except UnsupportedInputError as err:
        pytest.skip(f"{name} does not take {q.dtype}, head_dim={q.shape[-1]}: {err}")


def _seed(name: str, dtype: str) -> int:
    return sum(map(ord, name + dtype))


@functools.cache
def _oracle(name: str, dtype: str) -> tuple[torch.Tensor, ...]:
    """Float64 output and gradients on the CPU for the (rounded) inputs of ``name`` in ``dtype``."""
    case = CASES[name]
    q, k, v, dout = (t.double() for t in case.tensors(DTYPES[dtype], seed=_seed(name, dtype)))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    kwargs = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    ref = oracle_attention(q, k, v, case.segment_lengths, case.dilation_rates, case.causal, **kwargs)
    return (ref.detach(), *torch.autograd.grad(ref, (q, k, v), dout))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_oracle(backend, name, dtype):
    case = CASES[name]
    q, k, v, dout = case.tensors(DTYPES[dtype], seed=_seed(name, dtype), device="cuda")
    impl = _backend_or_skip(backend, q)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    kwargs = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    out = dilated_attention(q, k, v, case.config, backend=impl, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for tensor, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), _oracle(name, dtype)):
        assert torch.isfinite(got).all(), f"{tensor} has non-finite values"
        err = rel_err(got, want)
        key = f"{backend}/{dtype}/{tensor}"
        WORST[key] = max(WORST.get(key, 0.0), err)
        assert err < TOLERANCE, f"{tensor}: relative error {err:.3e} for {name}"


@pytest.mark.parametrize("name", ["heads_not_multiple_of_r", "paper_ragged_causal", "paper_ragged_noncausal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_per_call(backend, name):
    """Every kernel call of a plan, on exactly the tensors it gets, against the reference backend."""
    case = CASES[name]
    q, k, v, dout = case.tensors(torch.bfloat16, seed=_seed(name, "call"), device="cuda")
    impl = _backend_or_skip(backend, q)
    ref = ReferenceBackend()
    tasks = plan_tasks(case.config, case.n, case.heads, case.kv_heads, head_offset=case.head_offset,
                       position_offset=case.position_offset)  # fmt: skip
    for task in tasks:
        sel, kv = task.query, task.key_value
        args = [sel.gather(dout), sel.gather(q), kv.gather(k), kv.gather(v)]
        where = f"{task} shapes {[tuple(t.shape) for t in args]} strides {[t.stride() for t in args]}"
        out, lse = impl.forward(*args[1:], causal=case.causal, scale=0.125)
        want_out, want_lse = ref.forward(*(t.double() for t in args[1:]), causal=case.causal, scale=0.125)
        assert rel_err(out, want_out.cpu()) < TOLERANCE, f"forward out: {where}"
        assert (lse.double() - want_lse).abs().max().item() < 2e-2, f"forward lse: {where}"
        grads = impl.backward(*args, out, lse, causal=case.causal, scale=0.125)
        want = ref.backward(*(t.double() for t in (*args, out, lse)), causal=case.causal, scale=0.125)
        for i, (got, ref_grad) in enumerate(zip(grads, want)):
            # A one-key call has dq = dk = 0 exactly; the kernel's rounding noise is measured against 1e-3.
            assert rel_err(got, ref_grad, floor=1e-3) < TOLERANCE, f"grad {'qkv'[i]}: {where}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_lse_and_strided_inputs(backend):
    """One dense call on strided views: natural-log LSE and gradients equal the reference backend's."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    base = [torch.randn(3, 600, 8, 128, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4)]
    q, k, v, dout = (t[:, 1::2, ::2] for t in base)  # strided like a dilated selection
    impl = _backend_or_skip(backend, q)
    ref = ReferenceBackend()
    out, lse = impl.forward(q, k, v, causal=True, scale=0.1)
    want_out, want_lse = ref.forward(*(t.double() for t in (q, k, v)), causal=True, scale=0.1)
    assert lse.dtype == torch.float32 and lse.shape == (3, 4, 300)
    assert rel_err(out, want_out.cpu()) < TOLERANCE
    assert (lse.double() - want_lse).abs().max().item() < 2e-2
    grads = impl.backward(dout, q, k, v, out, lse, causal=True, scale=0.1)
    want = ref.backward(*(t.double() for t in (dout, q, k, v, out, lse)), causal=True, scale=0.1)
    for got, ref_grad in zip(grads, want):
        assert got.shape == q.shape
        assert rel_err(got, ref_grad.cpu()) < TOLERANCE


def test_auto_choice_prefers_fused_kernels():
    q = torch.zeros(1, 64, 4, 128, device="cuda", dtype=torch.bfloat16)
    backend = get_backend("auto", q)
    assert backend.name == "sdpa" and backend.select(q) == "cudnn"
    # float32 on CUDA: neither te nor cuDNN/flash take it; sdpa's memory-efficient kernel does.
    q32 = q.float()
    backend = get_backend("auto", q32)
    assert backend.name == "sdpa" and backend.select(q32) == "efficient"
    # The order itself: sdpa, then te where it imports, then the project's triton kernel, then the reference.
    from longnet_megatron.attention.backends import AUTO_ORDER

    assert AUTO_ORDER == ["sdpa", "te", "triton", "reference"]


def test_override_by_environment(monkeypatch):
    q = torch.zeros(1, 64, 4, 128, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("LONGNET_ATTENTION_BACKEND", "sdpa-flash")
    assert get_backend("auto", q).name == "sdpa-flash"


@pytest.mark.parametrize(
    ("backend", "dtype", "head_dim", "message"),
    [
        ("sdpa-flash", torch.float32, 128, "dtype float32 is not supported"),
        ("sdpa-cudnn", torch.float64, 64, "dtype float64 is not supported"),
        ("sdpa-flash", torch.bfloat16, 512, "head_dim=512"),
        ("te", torch.float32, 128, "needs float16 or bfloat16"),
        ("te", torch.bfloat16, 12, "head_dim a multiple of 8"),
    ],
)
def test_unsupported_inputs_fail_clearly(backend, dtype, head_dim, message):
    q = torch.zeros(1, 64, 2, head_dim, device="cuda", dtype=dtype)
    try:
        impl = get_backend(backend)
    except ImportError as err:
        pytest.skip(f"{backend} not importable here: {err}")
    with pytest.raises(UnsupportedInputError, match=message):
        impl.check(q)


def test_record_worst_errors(capsys):
    """Runs last: prints (and with LONGNET_GPU_RESULTS saves) the largest errors seen above."""
    if not WORST:
        pytest.skip("no backend ran")
    with capsys.disabled():
        print(f"\nlargest relative errors vs the float64 oracle ({torch.cuda.get_device_name()}):")
        for key in sorted(WORST):
            print(f"  {key:32s} {WORST[key]:.3e}")
    path = os.environ.get("LONGNET_GPU_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "worst": WORST}, f, indent=1, sort_keys=True)
