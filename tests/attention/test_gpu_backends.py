"""Fused GPU backends (te, sdpa and each of its kernels, fa4, triton) against the float64 oracle; needs CUDA.

bf16 and fp16, forward and gradients, relative error under 1e-2, on the named cases (ragged dilated
segments, partial last segments, GQA, global offsets) with realistic head sizes, plus longer cases
whose calls are large batches; the same with document masking (the variable-length paths: flash
``cum_seq`` for sdpa, THD for te, per-row bounds for triton), single variable-length calls against
the reference, and the split into dense runs plus one variable-length call. Also the automatic
choice and the clear errors. Setting ``LONGNET_GPU_RESULTS=path.json`` writes the largest error per
backend, dtype and tensor there.

A quick re-check of FlashAttention-4 (ragged, partial, GQA, offsets, causal and not, documents, strided
views; few kernel compiles, under a minute): ``LONGNET_TEST_BACKENDS=fa4 pytest
tests/attention/test_gpu_backends.py -k "$FA4_QUICK"`` with :data:`FA4_QUICK`'s -k expression.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import pytest
import torch

from longnet_megatron.attention import (
    UnsupportedInputError,
    backends,
    dilated_attention,
    documents,
    function,
    get_backend,
    packing,
)
from longnet_megatron.attention.backends.reference import ReferenceBackend
from longnet_megatron.attention.indexing import plan_tasks

from .cases import NAMED_CASES, Case, random_documents
from .oracle import oracle_attention

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2
# LONGNET_TEST_BACKENDS=te,sdpa-flash restricts the run (one process per backend isolates a crash).
BACKENDS = os.environ.get(
    "LONGNET_TEST_BACKENDS", "te,sdpa,sdpa-cudnn,sdpa-flash,sdpa-efficient,fa4,triton"
).split(",")
# The -k expression of the quick fa4 subset (module docstring): two cases in bf16, few compiles.
FA4_QUICK = "fa4 and (lse_and_strided or varlen_call or unsupported or (bf16 and (paper_ragged_d128 or gqa_noncausal_d64)))"
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


def _backend_or_skip(name: str, q: torch.Tensor, documents: bool = False):
    try:
        return get_backend(name, q, documents=documents)
    except ImportError as err:
        pytest.skip(f"{name} not importable here: {err}")
    except UnsupportedInputError as err:
        pytest.skip(f"{name} does not take {q.dtype}, head_dim={q.shape[-1]}: {err}")


def _seed(name: str, dtype: str) -> int:
    return sum(map(ord, name + dtype))


# Document masking: mean document lengths (tokens) per case, long and short against the segments.
DOC_CASES = {
    "paper_ragged_d128": 300.0,
    "geometric_partial_d128": 40.0,
    "gqa_noncausal_d64": 90.0,
    "gqa_offsets": 9.0,
}


def _document_ids(name: str) -> torch.Tensor | None:
    case = CASES[name]
    return (
        random_documents(case.batch, case.n, seed=len(name), rate=1.0 / DOC_CASES[name])
        if name in DOC_CASES
        else None
    )


@functools.cache
def _oracle(name: str, dtype: str, masked: bool = False) -> tuple[torch.Tensor, ...]:
    """Float64 output and gradients on the CPU for the (rounded) inputs of ``name`` in ``dtype``."""
    case = CASES[name]
    q, k, v, dout = (t.double() for t in case.tensors(DTYPES[dtype], seed=_seed(name, dtype)))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    kwargs = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    ids = _document_ids(name) if masked else None
    ref = oracle_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, case.causal, document_ids=ids, **kwargs
    )
    return (ref.detach(), *torch.autograd.grad(ref, (q, k, v), dout))


@pytest.mark.parametrize("calls", ["packed", "views"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_oracle(backend, name, dtype, calls, monkeypatch):
    """``packed``: small tasks packed across patterns (these sizes pack whole plans); ``views``: one
    call per task on strided views, the first pattern written in place (what long sequences do)."""
    monkeypatch.setattr(function, "_CALLS", {})
    if calls == "views":
        monkeypatch.setattr(packing, "PACK_BELOW", 0)
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


@pytest.mark.parametrize("split", ["auto", "dense_runs"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(DOC_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_with_documents_matches_oracle(backend, name, dtype, split, monkeypatch):
    """Document masking through the backend's variable-length path (and, with ``dense_runs``, every
    whole-document run of segments kept as a dense call)."""
    if split == "dense_runs":
        monkeypatch.setattr(documents, "DENSE_RUN_ELEMENTS", 1)
    case = CASES[name]
    q, k, v, dout = case.tensors(DTYPES[dtype], seed=_seed(name, dtype), device="cuda")
    impl = _backend_or_skip(backend, q, documents=True)
    if split == "dense_runs" and impl.varlen_cost <= 1.0:
        pytest.skip(f"{backend} runs every call with a boundary variable-length (no dense runs)")
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    kwargs = {"head_offset": case.head_offset, "position_offset": case.position_offset}
    ids = _document_ids(name).cuda()
    out = dilated_attention(q, k, v, case.config, backend=impl, document_ids=ids, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for tensor, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), _oracle(name, dtype, True)):
        assert torch.isfinite(got).all(), f"{tensor} has non-finite values"
        err = rel_err(got, want)
        key = f"{backend}/{dtype}/documents/{tensor}"
        WORST[key] = max(WORST.get(key, 0.0), err)
        assert err < TOLERANCE, f"{tensor}: relative error {err:.3e} for {name} with documents"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_varlen_call(backend, causal):
    """One variable-length call on strided views (as a dilated selection gives them) vs the reference:
    one-row sequences, short ones, one longer than a kernel block, the natural-log LSE."""
    lengths = [1, 7, 300, 1, 1, 64, 900, 2]
    total, h, d = sum(lengths), 8, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    base = [
        torch.randn(total * 2, 2 * h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)
    ]
    q, k, v, dout = (t[::2, ::2] for t in base)  # row and head strides of a dilated selection
    impl = _backend_or_skip(backend, q[None], documents=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ref = ReferenceBackend()
    out, lse = impl.forward_varlen(q, k, v, cu, max(lengths), causal=causal, scale=0.1)
    want_out, want_lse = ref.forward_varlen(*(t.double() for t in (q, k, v)), cu, max(lengths), causal=causal,
                                            scale=0.1)  # fmt: skip
    assert out.shape == q.shape and lse.shape == (h, total) and lse.dtype == torch.float32
    assert rel_err(out, want_out) < TOLERANCE
    assert (lse.double() - want_lse).abs().max().item() < 2e-2
    grads = impl.backward_varlen(dout, q, k, v, out, lse, cu, max(lengths), causal=causal, scale=0.1)
    want = ref.backward_varlen(*(t.double() for t in (dout, q, k, v, out, lse)), cu, max(lengths),
                               causal=causal, scale=0.1)  # fmt: skip
    for i, (got, ref_grad) in enumerate(zip(grads, want)):
        assert got.shape == q.shape
        assert rel_err(got, ref_grad, floor=1e-3) < TOLERANCE, f"grad {'qkv'[i]}"


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


def test_auto_choice_prefers_fused_kernels(monkeypatch):
    q = torch.zeros(1, 64, 4, 128, device="cuda", dtype=torch.bfloat16)
    fa4 = get_backend("fa4")
    fa4_runs = fa4.missing is None and torch.cuda.get_device_capability()[0] in (9, 10)
    assert get_backend("auto", q).name == ("fa4" if fa4_runs else "sdpa")
    assert get_backend("auto", q, documents=True).name == ("fa4" if fa4_runs else "sdpa")
    monkeypatch.setattr(backends, "AUTO_ORDER", [b for b in backends.AUTO_ORDER if b != "fa4"])
    backend = get_backend("auto", q)
    assert backend.name == "sdpa" and backend.select(q) == "cudnn"
    # float32 on CUDA: neither te nor cuDNN/flash take it; sdpa's memory-efficient kernel does.
    q32 = q.float()
    backend = get_backend("auto", q32)
    assert backend.name == "sdpa" and backend.select(q32) == "efficient"
    # Document masking: sdpa's variable-length path is its flash kernel (half precision only).
    assert get_backend("auto", q, documents=True).name == "sdpa"
    assert get_backend("auto", q32, documents=True).name == "reference"
    # The order itself: fa4 where it runs, sdpa, te where it imports, the project's triton kernel, the reference.
    monkeypatch.undo()
    assert backends.AUTO_ORDER == ["fa4", "sdpa", "te", "triton", "reference"]


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
        ("fa4", torch.float32, 128, "needs float16 or bfloat16"),
        ("fa4", torch.bfloat16, 12, "needs head_dim a multiple of 8"),
    ],
)
def test_unsupported_inputs_fail_clearly(backend, dtype, head_dim, message):
    q = torch.zeros(1, 64, 2, head_dim, device="cuda", dtype=dtype)
    try:
        impl = get_backend(backend)
    except ImportError as err:
        pytest.skip(f"{backend} not importable here: {err}")
    if getattr(impl, "missing", None):  # fa4 loads without its library and names it in check()
        pytest.skip(impl.missing)
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
