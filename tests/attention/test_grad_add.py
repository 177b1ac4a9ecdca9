"""The fused (Triton) add of one call's (dq_i, dk_i, dv_i) against the three Selection.add calls.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a
GPU the same tests run it compiled. Each destination element takes one add, computed in float32 and
rounded once on both paths, so the results match exactly, in bfloat16 too; only the interpreter (Triton
3.6) rounds float32 to bfloat16 by truncation, so there a bfloat16 result must be one of the two
bfloat16 neighbours of the exact float32 sum (see :func:`_assert_matches`).
"""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import grad_add
from longnet_megatron.attention.grad_add import _add_fused, _add_torch, add_call_grads
from longnet_megatron.attention.indexing import RowBlock, Selection
from longnet_megatron.attention.packing import PackedSelection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, N, H, HKV, D = 2, 40, 6, 3, 24  # D not a power of two: the column mask is exercised

# (query selection, key/value selection, key/value heads)
CASES = {
    "view_r1": lambda: (Selection(RowBlock(0, 5, 8, 8, 1), slice(0, H)),) * 2 + (H,),
    "strided_rows_and_heads": lambda: (Selection(RowBlock(1, 2, 6, 18, 3), slice(1, H, 3)),) * 2 + (H,),
    "one_clipped_segment": lambda: (Selection(RowBlock(33, 1, 3, 16, 2), slice(2, H, 2)),) * 2 + (H,),
    # GQA, groups of 2: query heads 1 and 4 read key/value heads 0 and 2
    "gqa_other_head_slice": lambda: (
        Selection(RowBlock(1, 2, 6, 18, 3), slice(1, H, 3)),
        Selection(RowBlock(1, 2, 6, 18, 3), slice(0, HKV, 2)),
        HKV,
    ),
    "kv_rows_differ": lambda: (
        Selection(RowBlock(2, 3, 4, 8, 2), slice(0, H, 2)),
        Selection(RowBlock(5, 3, 4, 12, 3), slice(1, HKV, 1)),
        HKV,
    ),
}


def _tensors(
    name: str, dtype: torch.dtype, grad_dtype: torch.dtype, head_dim: int = D
) -> tuple[Selection, Selection, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    sel, kv, hkv = CASES[name]()
    gen = torch.Generator().manual_seed(11)
    rand = lambda *shape, dt: torch.randn(*shape, generator=gen).to(DEVICE, dt)
    dq, dk, dv = (
        rand(B, N, H, head_dim, dt=dtype),
        rand(B, N, hkv, head_dim, dt=dtype),
        rand(B, N, hkv, head_dim, dt=dtype),
    )
    q_like, kv_like = sel.gather(dq), kv.gather(dk)
    grads = (
        rand(*q_like.shape, dt=grad_dtype),
        rand(*kv_like.shape, dt=grad_dtype),
        rand(*kv_like.shape, dt=grad_dtype),
    )
    return sel, kv, grads, (dq, dk, dv)


def _assert_matches(
    got: tuple[torch.Tensor, ...],
    want: tuple[torch.Tensor, ...],
    base: tuple[torch.Tensor, ...],
    sel: Selection | PackedSelection,
    kv: Selection | PackedSelection,
    grads: tuple[torch.Tensor, ...],
) -> None:
    """``got`` (the kernel's) equals ``want`` (the three adds'), both ``base`` + ``grads``.

    Triton's interpreter casts float32 to bfloat16 by truncating the mantissa, where PyTorch and the
    compiled kernel round to nearest even; on CPU a bfloat16 result is therefore checked against the
    exact float32 sums instead: each element is that sum rounded (as PyTorch has it) or truncated.
    """
    exact = tuple(t.to(torch.promote_types(t.dtype, torch.float32), copy=True) for t in base)
    _add_torch(sel, kv, tuple(g.to(exact[0].dtype) for g in grads), *exact)
    for g, w, e in zip(got, want, exact):
        assert g.dtype == w.dtype
        if DEVICE == "cpu" and g.dtype == torch.bfloat16:
            assert torch.equal(w, e.to(torch.bfloat16))  # PyTorch: the float32 sum, rounded once
            truncated = (e.view(torch.int32) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)
            assert ((g == w) | (g == truncated)).all()
        else:
            assert torch.equal(g, w)


DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16_grads_into_fp32": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_add_equals_the_three_selection_adds(name, dtypes):
    sel, kv, grads, want = _tensors(name, *DTYPES[dtypes])
    base, got = tuple(t.clone() for t in want), tuple(t.clone() for t in want)
    assert grad_add._fused_takes(sel, kv, grads, *got)
    _add_torch(sel, kv, grads, *want)
    _add_fused(sel, kv, grads, *got)
    _assert_matches(got, want, base, sel, kv, grads)


@pytest.mark.parametrize("head_dim", [40, 128])
def test_fused_add_other_head_dims(head_dim):
    sel, kv, grads, want = _tensors("gqa_other_head_slice", torch.bfloat16, torch.bfloat16, head_dim)
    base, got = tuple(t.clone() for t in want), tuple(t.clone() for t in want)
    _add_torch(sel, kv, grads, *want)
    _add_fused(sel, kv, grads, *got)
    _assert_matches(got, want, base, sel, kv, grads)


def test_fused_add_reads_strided_grads():
    """Gradients with a contiguous last dimension but padded rows (a slice of a wider tensor)."""
    sel, kv, grads, want = _tensors("strided_rows_and_heads", torch.float32, torch.float32)
    grads = tuple(torch.cat([g, torch.full_like(g, float("nan"))], dim=-1)[..., :D] for g in grads)
    assert not grads[0].is_contiguous()
    base, got = tuple(t.clone() for t in want), tuple(t.clone() for t in want)
    _add_torch(sel, kv, grads, *want)
    _add_fused(sel, kv, grads, *got)
    _assert_matches(got, want, base, sel, kv, grads)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """:func:`add_call_grads` takes the kernel on CPU tensors too, wherever it would on CUDA; the
    returned list records the launches."""
    if grad_add.triton is None:
        pytest.fail("triton is a test dependency (requirements-dev.txt)")
    launches = []

    def launch(*args):
        launches.append(args[:2])
        _add_fused(*args)

    monkeypatch.setattr(
        grad_add, "_fused_applies", lambda *args: grad_add.FUSED and grad_add._fused_takes(*args)
    )
    monkeypatch.setattr(grad_add, "_add_fused", launch)
    return launches


def test_views_take_the_kernel(fused_everywhere):
    sel, kv, grads, want = _tensors("gqa_other_head_slice", torch.bfloat16, torch.bfloat16)
    base, got = tuple(t.clone() for t in want), tuple(t.clone() for t in want)
    add_call_grads(sel, kv, grads, *got)
    _add_torch(sel, kv, grads, *want)
    assert len(fused_everywhere) == 1
    _assert_matches(got, want, base, sel, kv, grads)


def _packed(heads: slice) -> PackedSelection:
    parts = [Selection(RowBlock(0, 2, 5, 20, 4), heads), Selection(RowBlock(2, 1, 5, 40, 3), heads)]
    return PackedSelection.stack(parts, B, N, H, torch.device(DEVICE))


FALLBACKS = {
    "tuple_kv_heads": lambda: (Selection(RowBlock(1, 2, 6, 18, 3), slice(1, H, 3)), Selection(RowBlock(1, 2, 6, 18, 3), (0, 2)), torch.float32),
    "tuple_heads_repeated": lambda: (Selection(RowBlock(1, 2, 6, 18, 3), (1, 1)), Selection(RowBlock(1, 2, 6, 18, 3), (0, 0)), torch.float32),
    "rows_not_strided": lambda: (Selection(RowBlock(0, 2, 5, 20, 2), slice(0, H)),) * 2 + (torch.float32,),
    "packed": lambda: (_packed(slice(0, H, 2)),) * 2 + (torch.float32,),
    "float64": lambda: (Selection(RowBlock(0, 5, 8, 8, 1), slice(0, H)),) * 2 + (torch.float64,),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_other_selections_take_the_selection_adds(name, fused_everywhere):
    sel, kv, dtype = FALLBACKS[name]()
    hkv = H if isinstance(kv, PackedSelection) else HKV
    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    want = rand(B, N, H, D), rand(B, N, hkv, D), rand(B, N, hkv, D)
    grads = rand(*sel.gather(want[0]).shape), rand(*kv.gather(want[1]).shape), rand(*kv.gather(want[2]).shape)
    got = tuple(t.clone() for t in want)
    add_call_grads(sel, kv, grads, *got)
    _add_torch(sel, kv, grads, *want)
    assert fused_everywhere == []  # the kernel was not launched
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # repeats: CUDA's index_add_ in any order


def test_the_kernel_is_off_when_not_fused(fused_everywhere, monkeypatch):
    monkeypatch.setattr(grad_add, "FUSED", False)
    sel, kv, grads, want = _tensors("view_r1", torch.float32, torch.float32)
    add_call_grads(sel, kv, grads, *want)
    assert fused_everywhere == []


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU gate")
def test_cpu_tensors_take_the_selection_adds(monkeypatch):
    monkeypatch.setattr(grad_add, "_add_fused", lambda *args: pytest.fail("kernel launched on CPU tensors"))
    sel, kv, grads, want = _tensors("view_r1", torch.float32, torch.float32)
    base, got = tuple(t.clone() for t in want), tuple(t.clone() for t in want)
    add_call_grads(sel, kv, grads, *got)
    _add_torch(sel, kv, grads, *want)
    _assert_matches(got, want, base, sel, kv, grads)
