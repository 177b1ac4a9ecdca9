"""The output layer and cross-entropy in sequence chunks: per-token loss without the [s, b, V] logits.

At long context the logits dominate memory: 1M tokens x a 100K vocabulary are 200 GB in bf16, and
Megatron's vocab-parallel cross-entropy keeps an fp32 softmax of that shape for backward. Here the
projection and the loss run ``chunk_tokens`` tokens at a time. Forward keeps only the per-token
log-sum-exp; backward recomputes each chunk's logits and forms (softmax - onehot) * grad in place, so
the extra memory is one chunk's logits (about 8 bytes x chunk_tokens x V / tp at bf16), at the cost of
one more logits GEMM. The math is Megatron's ``VocabParallelCrossEntropy`` (all-reduces of the max, the
sum of exponentials and the target logit over the tensor-parallel group; its gradient helpers are used
as they are), and the input side is
``ColumnParallelLinear``'s (copy to the TP region, or the sequence-parallel all-gather), so loss and
gradients equal those of ``output_layer`` + ``compute_language_model_loss``.

On CUDA each chunk's softmax statistics and its logits gradient are one Triton pass each over the
logits in their own dtype (:mod:`.fused_cross_entropy`) instead of PyTorch's float32 passes, and the
output weight's gradient is accumulated in float32 by the GEMM itself where PyTorch offers it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from . import fused_cross_entropy as fused


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    *,
    bias: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of ``cross_entropy(hidden @ weight.T + bias, labels)``, chunk by chunk.

    hidden: ``[s, b, h]`` (``[s / tp, b, h]`` under sequence parallelism); weight: this rank's vocabulary
    shard ``[V / tp, h]`` (shards in rank order); labels: ``[b, s]`` token ids of the whole vocabulary.
    tp_group: the group the vocabulary is split over (None: no tensor parallelism).
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer")
    if tp_group is not None:  # ColumnParallelLinear's input side; identities when the group has one rank
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=True, group=tp_group
            )
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match hidden [s={s}, b={b}, h]: expected [b, s]"
        )
    target = labels.transpose(0, 1).reshape(s * b)  # token order of hidden's rows
    loss = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(s * b, h), weight, bias, target, chunk_tokens, tp_group
    )
    return loss.view(s, b).transpose(0, 1).contiguous()


def _vocab_range(vocab_local: int, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    rank = tp_group.rank() if tp_group is not None else 0
    return rank * vocab_local, (rank + 1) * vocab_local


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, tp_group: dist.ProcessGroup | None) -> None:
    if tp_group is not None and tp_group.size() > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's local logits in the parameters' dtype, as ColumnParallelLinear computes them."""
    return torch.matmul(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp16 / fp32 logits (Megatron's choice); fp64 stays fp64 (tight tests)."""
    return torch.promote_types(dtype, torch.float32)


def _local_target(
    target: torch.Tensor, vocab_start: int, vocab_end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of targets outside this rank's shard, local target index with those set to 0).

    Megatron's helper assigns through boolean masks, a device sync each; once per chunk that adds up.
    """
    mask = (target < vocab_start) | (target >= vocab_end)
    return mask, (target - vocab_start).masked_fill_(mask, 0)


def _chunk_loss_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    vocab_end: int,
    tp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log-sum-exp) per token of one chunk of local logits (fp32 at least, overwritten)."""
    logits_max = logits.max(dim=-1)[0]
    _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
    mask, local = _local_target(target, vocab_start, vocab_end)
    logits.sub_(logits_max.unsqueeze(-1))
    predicted = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill_(mask, 0.0)
    stats = torch.stack((predicted, logits.exp_().sum(dim=-1)))  # one all-reduce for both sums
    _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
    log_sum_exp = torch.log(stats[1])
    return log_sum_exp - stats[0], log_sum_exp + logits_max


def _chunk_loss_stats_fused(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_chunk_loss_stats` from one kernel pass over the logits (kept as they are) per rank."""
    local_max, sum_exp, picked = fused.chunk_softmax_stats(logits, target, vocab_start)
    if tp_group is not None and tp_group.size() > 1:
        logits_max = local_max.clone()
        _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
        stats = torch.stack((picked, sum_exp * torch.exp(local_max - logits_max)))
        _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
        picked, sum_exp, local_max = stats[0], stats[1], logits_max
    log_sum_exp = torch.log(sum_exp) + local_max
    return log_sum_exp - picked, log_sum_exp


def _grad_logits(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int,
    vocab_end: int,
) -> torch.Tensor:
    """(softmax - onehot(target)) * grad_loss of one chunk, in fp32 (at least), overwriting ``logits``."""
    softmax = logits.to(_softmax_dtype(logits.dtype)).sub_(lse.unsqueeze(-1)).exp_()
    target_mask, masked_target = _local_target(target, vocab_start, vocab_end)
    grad_2d, arange_1d, softmax_update, grad_input = (
        VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
    )
    return VocabParallelCrossEntropy.calculate_gradients(
        grad_2d, arange_1d, masked_target, softmax_update, grad_input, grad_loss
    )


def _chunk_grad(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_range: tuple[int, int],
    dtype: torch.dtype,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gradient of one chunk's logits in ``dtype``, its column sums in float32 or None).

    The kernel writes it over the logits when it can (no bias, whose sum wants the float32 values).
    """
    if not need_bias and logits.dtype == dtype and fused.fused_applies(logits):
        return fused.chunk_logits_grad_(logits, lse, target, grad_loss, vocab_range[0]), None
    grad_logits = _grad_logits(logits, lse, target, grad_loss, *vocab_range)
    bias_grad = grad_logits.sum(dim=0) if need_bias else None
    return grad_logits.to(dtype), bias_grad


# Whether torch.addmm takes out_dtype (float32 results of half-precision operands) here; None: untried.
_ADDMM_OUT_DTYPE: bool | None = None


def _add_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``grad_weight += grad_logits.T @ hidden``; a float32 accumulator of half-precision operands is
    added to by the GEMM itself where PyTorch can (CUDA), else through a product in their dtype."""
    global _ADDMM_OUT_DTYPE
    if grad_weight.dtype == hidden.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
        return
    if grad_weight.is_cuda and fused.FUSED and _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(grad_weight, grad_logits.t(), hidden, grad_weight.dtype, out=grad_weight)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError):  # older PyTorch: no addmm.dtype_out on this device
            _ADDMM_OUT_DTYPE = False
    grad_weight += torch.mm(grad_logits.t(), hidden)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """hidden ``[n, h]`` (replicated over TP), weight ``[V_local, h]``, target ``[n]`` -> loss ``[n]`` (>= fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_tokens, tp_group):
        n = hidden.shape[0]
        vocab_start, vocab_end = _vocab_range(weight.shape[0], tp_group)
        loss = torch.empty(n, dtype=_softmax_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(loss)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, n))
            logits = _logits(hidden[rows], weight, bias)
            if fused.fused_applies(logits):
                stats = _chunk_loss_stats_fused(logits, target[rows], vocab_start, tp_group)
            else:
                stats = _chunk_loss_stats(
                    logits.to(loss.dtype), target[rows], vocab_start, vocab_end, tp_group
                )
            loss[rows], lse[rows] = stats
            del logits
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk_tokens, ctx.vocab_range = chunk_tokens, (vocab_start, vocab_end)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators across chunks (:func:`_add_weight_grad`: each chunk's product added in fp32).
        acc = _softmax_dtype(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        n, chunk = hidden.shape[0], ctx.chunk_tokens
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            grad_logits, bias_grad = _chunk_grad(
                _logits(hidden[rows], weight, bias),
                lse[rows],
                target[rows],
                grad_loss[rows],
                ctx.vocab_range,
                hidden.dtype,
                need_bias,
            )
            if need_bias:
                grad_bias += bias_grad
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight:
                _add_weight_grad(grad_weight, grad_logits, hidden[rows])
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None
