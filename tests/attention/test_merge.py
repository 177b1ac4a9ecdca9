"""The fused (Triton) log-sum-exp merge against the PyTorch one, on every kind of selection.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a
GPU the same tests run it compiled. The dilated attention tests on the GPU cover it end to end.
"""

from __future__ import annotations

import os

import pytest
import torch

from longnet_megatron.attention.indexing import RowBlock, Selection
from longnet_megatron.attention.merge import merge_partial_fused, merge_partial_torch
from longnet_megatron.attention.packing import PackedSelection

from .cases import NAMED_CASES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, N, H, D = 2, 40, 6, 24  # D not a power of two: the column mask is exercised


def _state(seed: int, some_unseen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(B, N, H, D, generator=gen)
    lse = torch.randn(B, N, H, generator=gen)
    if some_unseen:  # rows no earlier call reached: the merge must take O_i and L_i as they are
        lse[:, ::3] = float("-inf")
        out[:, ::3] = 0.0
    return out.to(DEVICE), lse.to(DEVICE)


SELECTIONS = {
    "view_r1": lambda: Selection(RowBlock(0, 5, 8, 8, 1), slice(0, H)),
    "strided_rows_and_heads": lambda: Selection(RowBlock(1, 2, 7, 20, 3), slice(1, H, 3)),
    "one_clipped_segment": lambda: Selection(RowBlock(33, 1, 3, 16, 2), slice(2, H, 2)),
    "packed": lambda: PackedSelection.stack(
        [
            Selection(RowBlock(0, 2, 5, 20, 4), slice(0, H, 2)),
            Selection(RowBlock(2, 1, 5, 40, 3), slice(1, H, 2)),
        ],
        B,
        N,
        H,
        torch.device(DEVICE),
    ),  # fmt: skip
    "packed_heads_as_batch": lambda: PackedSelection.stack(
        [
            Selection(RowBlock(0, 2, 5, 20, 4), slice(0, H, 2)),
            Selection(RowBlock(3, 1, 5, 40, 2), slice(1, H, 6)),
        ],
        B,
        N,
        H,
        torch.device(DEVICE),
        heads_as_batch=True,
    ),  # fmt: skip
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("some_unseen", [False, True], ids=["seen", "unseen"])
@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_fused_merge_equals_torch_merge(name, some_unseen, dtype):
    sel = SELECTIONS[name]()
    like = sel.gather(torch.zeros(B, N, H, D, device=DEVICE))
    gen = torch.Generator().manual_seed(7)
    o_i = torch.randn(like.shape, generator=gen).to(DEVICE, dtype)
    # L_i as the kernels give it, [b, h, l], and here a transposed view (not contiguous)
    l_i = torch.randn(like.shape[0], like.shape[1], like.shape[2], generator=gen).to(DEVICE).transpose(1, 2)
    want_out, want_lse = _state(3, some_unseen)
    got_out, got_lse = want_out.clone(), want_lse.clone()
    merge_partial_torch(want_out, want_lse, sel, o_i, l_i)
    merge_partial_fused(got_out, got_lse, sel, o_i, l_i)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(B, N, H, dtype=torch.bool, device=DEVICE)
    sel.put(untouched, torch.zeros(like.shape[:3], dtype=torch.bool, device=DEVICE))
    before_out, before_lse = _state(3, some_unseen)
    assert torch.equal(got_out[untouched], before_out[untouched])  # nothing outside the selection moves
    assert torch.equal(got_lse[untouched], before_lse[untouched])


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The fused online merge on CPU tensors too (Triton's interpreter), wherever it would apply on
    CUDA; the deferred merge (tests/attention/test_deferred_merge.py) is off, so every call merges online."""
    from longnet_megatron.attention import deferred, merge

    monkeypatch.setattr(deferred, "ENABLED", False)
    if merge.triton is None:
        pytest.fail("triton is a test dependency (requirements-dev.txt)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Compiled Triton cannot read CPU tensors; on a GPU the kernel runs end to end in the oracle
        # tests of tests/attention/test_gpu_backends.py (ragged cases take the online merge).
        pytest.skip("the kernel runs on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    calls = []

    def on_cpu_too(out, lse, sel, o_i):
        calls.append(merge.fused_takes(out, lse, sel, o_i))
        return calls[-1]

    monkeypatch.setattr(merge, "_fused_applies", on_cpu_too)
    return calls


@pytest.mark.parametrize("name", ["paper_ragged_causal", "gqa_offsets", "n_multiple_of_largest"])
def test_dilated_attention_with_the_fused_merge_matches_the_oracle(name, fused_everywhere):
    from .test_dilated_attention import check_against_oracle

    check_against_oracle(NAMED_CASES[name], torch.float32, seed=5)
    assert any(fused_everywhere)  # the kernel took part


def test_decoding_with_the_fused_merge_matches_the_full_function(fused_everywhere):
    from .test_decode import test_float32_decoding_matches_the_full_function as float32_decoding

    float32_decoding()
    assert any(fused_everywhere)
