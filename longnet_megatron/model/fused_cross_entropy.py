"""One chunk's cross-entropy in single passes over its logits: Triton kernels for the chunked loss.

:mod:`.chunked_loss` computes, per chunk of ``C`` tokens and a vocabulary shard of ``V`` entries, the
softmax statistics of the logits in the forward and ``(softmax - onehot) * grad`` in the backward. In
PyTorch that is about ten elementwise passes over a float32 ``[C, V]`` copy each way (with 4096 tokens
and a 100K vocabulary, 1.6 GB a pass): at 128K tokens a step, more time than the logits GEMMs save.

Here each direction is one pass over the logits in their own dtype:

* :func:`chunk_softmax_stats`: per row the maximum, the sum of ``exp(x - max)`` (an online softmax over
  column blocks) and the target's logit (0 where the target is in another rank's shard), in float32.
  The caller combines them over the tensor-parallel group as Megatron's ``VocabParallelCrossEntropy``
  does (max, then the sums).
* :func:`chunk_logits_grad_`: ``(exp(x - lse) - [j == target]) * grad`` computed in float32 and rounded
  once into the logits' own storage, which is what the float32 path gives after its cast back.

The math is the PyTorch path's; only the order of the float32 sums differs. On CPU the kernels run in
Triton's interpreter (tests); the chunked loss takes them on CUDA only (:func:`fused_applies`).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

# Columns per block: the forward's online softmax steps over a row in blocks of this many.
_STATS_BLOCK = 4096
# Columns per program of the backward (a 2-D grid of rows x column blocks).
_GRAD_BLOCK = 2048
# Logits dtypes the kernels take (float64 keeps the PyTorch path and its tight tests).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# False (or LONGNET_FUSED_LOSS=0 in the environment): every chunk takes the PyTorch path, and the
# weight gradient's float32 GEMM accumulation is off too (benchmarks compare the two).
FUSED = os.environ.get("LONGNET_FUSED_LOSS", "1") != "0"


def fused_applies(logits: torch.Tensor) -> bool:
    """True when the kernels take this chunk: Triton present, on CUDA, a supported dtype, unit column
    stride. (Tests call the kernels on CPU tensors in Triton's interpreter.)"""
    return (
        FUSED
        and triton is not None
        and logits.is_cuda
        and logits.dtype in _DTYPES
        and logits.dim() == 2
        and logits.stride(1) == 1
    )


def chunk_softmax_stats(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max, sum of exp(logits - max), target logit or 0) of ``logits [C, V]``, each ``[C]`` float32.

    ``target`` ``[C]``: token ids of the whole vocabulary; this shard holds ids
    ``vocab_start .. vocab_start + V``.
    """
    rows, vocab = logits.shape
    out = torch.empty((3, rows), dtype=torch.float32, device=logits.device)
    if rows:
        _stats_kernel[(rows,)](
            logits, logits.stride(0), target, out[0], out[1], out[2], vocab, vocab_start,
            BLOCK=min(_STATS_BLOCK, triton.next_power_of_2(vocab)), num_warps=8,
        )  # fmt: skip
    return out[0], out[1], out[2]


def chunk_logits_grad_(
    logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor,
    vocab_start: int,
) -> torch.Tensor:  # fmt: skip
    """Overwrite ``logits [C, V]`` with ``(softmax - onehot(target)) * grad_loss`` and return it.

    ``lse`` ``[C]``: the log-sum-exp over the whole vocabulary (all shards); ``grad_loss`` ``[C]``: the
    gradient of each token's loss; ``target`` as in :func:`chunk_softmax_stats`.
    """
    rows, vocab = logits.shape
    if rows:
        block = min(_GRAD_BLOCK, triton.next_power_of_2(vocab))
        _grad_kernel[(rows, triton.cdiv(vocab, block))](
            logits, logits.stride(0), lse.float().contiguous(), target, grad_loss.float().contiguous(),
            vocab, vocab_start, BLOCK=block, num_warps=8,
        )  # fmt: skip
    return logits


if triton is not None:

    @triton.jit
    def _stats_kernel(
        logits, row_stride, target, max_out, sum_out, target_out, vocab, vocab_start, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * row_stride
        cols = tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        s = tl.sum(tl.exp(x - m), 0)
        for start in range(BLOCK, vocab, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        local = tl.load(target + row) - vocab_start
        inside = (local >= 0) & (local < vocab)
        picked = tl.load(base + tl.where(inside, local, 0)).to(tl.float32)
        tl.store(max_out + row, m)
        tl.store(sum_out + row, s)
        tl.store(target_out + row, tl.where(inside, picked, 0.0))

    @triton.jit
    def _grad_kernel(logits, row_stride, lse, target, grad_loss, vocab, vocab_start, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ptrs = logits + row.to(tl.int64) * row_stride + cols
        x = tl.load(ptrs, mask=cols < vocab, other=0.0).to(tl.float32)
        p = tl.exp(x - tl.load(lse + row))
        local = tl.load(target + row) - vocab_start
        g = (p - tl.where(cols == local, 1.0, 0.0)) * tl.load(grad_loss + row)
        tl.store(ptrs, g.to(logits.dtype.element_ty), mask=cols < vocab)
