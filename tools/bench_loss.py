"""Benchmark the chunked output layer + cross-entropy: the Triton kernels against the PyTorch path.

Times one forward+backward of :func:`~longnet_megatron.model.chunked_linear_cross_entropy` (what the
trainer runs for the loss at long context) with its fused kernels (``fused_cross_entropy.FUSED``) and
without, on the same inputs in one process, beside the floor of its GEMMs alone (the logits twice, the
hidden and weight gradients, chunk by chunk) and, up to ``--plain-max-n`` tokens, PyTorch's unchunked
``F.linear`` + ``F.cross_entropy``. Also prints the largest difference of the loss and gradients
between the two chunked paths.

    python tools/bench_loss.py --n 32768,131072 --hidden 2048 --vocab 100352 --chunk 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longnet_megatron.model import chunked_linear_cross_entropy, chunked_loss, fused_cross_entropy  # noqa: E402,I001


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median CUDA-event time of ``fn`` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gemm_floor_ms(hidden: torch.Tensor, weight: torch.Tensor, chunk: int, reps: int) -> float:
    """The chunked loss's GEMMs alone: logits (forward and again in backward), hidden and weight grads."""
    n = hidden.shape[0]
    logits = torch.empty(min(chunk, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def run() -> None:
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            out = logits[: rows.stop - rows.start]
            torch.mm(hidden[rows], weight.t(), out=out)
            torch.mm(hidden[rows], weight.t(), out=out)
            torch.mm(out, weight, out=grad_hidden[rows])
            chunked_loss._add_weight_grad(grad_weight, out, hidden[rows])

    return median_ms(run, reps)


def measure(n: int, weight: torch.Tensor, args: argparse.Namespace) -> dict:
    """One row: both chunked paths, the GEMM floor and the unchunked loss at ``n`` tokens."""
    hidden = torch.randn(n, 1, args.hidden, device="cuda").bfloat16()
    labels = torch.randint(0, args.vocab, (1, n), device="cuda")
    grad = torch.rand(1, n, device="cuda")

    def chunked(fused: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        fused_cross_entropy.FUSED = fused
        params = [t.detach().requires_grad_() for t in (hidden, weight)]
        loss = chunked_linear_cross_entropy(params[0], params[1], labels, args.chunk)
        out = loss.detach(), torch.autograd.grad((loss * grad).sum(), params)
        fused_cross_entropy.FUSED = True
        return out

    def plain() -> None:
        params = [t.detach().requires_grad_() for t in (hidden, weight)]
        logits = F.linear(params[0][:, 0], params[1]).float()
        loss = F.cross_entropy(logits, labels[0], reduction="none")
        torch.autograd.grad((loss * grad[0]).sum(), params)

    row = {"n": n, "hidden": args.hidden, "vocab": args.vocab, "chunk": args.chunk}
    row["fused_ms"] = median_ms(lambda: chunked(True), args.reps)
    row["torch_ms"] = median_ms(lambda: chunked(False), args.reps)
    row["gemm_floor_ms"] = gemm_floor_ms(hidden[:, 0], weight, args.chunk, args.reps)
    row["plain_ms"] = median_ms(plain, args.reps) if n <= args.plain_max_n else None
    (loss_f, grads_f), (loss_t, grads_t) = chunked(True), chunked(False)
    row["loss_max_diff"] = (loss_f - loss_t).abs().max().item()
    for name, a, b in zip(("hidden", "weight"), grads_f, grads_t):
        row[f"grad_{name}_rel_diff"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    del loss_f, grads_f, loss_t, grads_t
    for name, fused in (("fused", True), ("torch", False)):
        torch.cuda.reset_peak_memory_stats()
        chunked(fused)
        row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--n", type=ints, default=[32768, 131072], help="tokens of a micro-batch")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (1.3b: 2048)")
    p.add_argument("--vocab", type=int, default=100352, help="vocabulary (cl100k_base padded to 128)")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per chunk (the trainer's default)")
    p.add_argument("--plain-max-n", type=int, default=32768, help="unchunked PyTorch loss up to this N")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss needs a CUDA device")
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device="cuda") / args.hidden**0.5).bfloat16()
    rows = []
    device = torch.cuda.get_device_name()
    print(f"{device}, bf16, h = {args.hidden}, V = {args.vocab}, chunks of {args.chunk} tokens; fwd+bwd ms")
    for n in args.n:
        row = measure(n, weight, args)
        rows.append(row)
        plain_text = f"{row['plain_ms']:.1f}" if row["plain_ms"] is not None else "-"
        print(f"N={n}: fused {row['fused_ms']:.1f}, PyTorch path {row['torch_ms']:.1f} "
              f"({row['torch_ms'] / row['fused_ms']:.2f}x), GEMMs alone {row['gemm_floor_ms']:.1f}, "
              f"unchunked {plain_text}; peak {row['fused_peak_gib']:.2f} / {row['torch_peak_gib']:.2f} GiB; "
              f"loss diff {row['loss_max_diff']:.2e}, grad rel diff {row['grad_hidden_rel_diff']:.2e} / "
              f"{row['grad_weight_rel_diff']:.2e}")  # fmt: skip
        torch.cuda.empty_cache()
    meta = {"device": device, "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.out_md:
        Path(args.out_md).write_text(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = [
        f"{meta['device']}, torch {meta['torch']}, bf16; one forward+backward of the output layer + loss",
        "",
        "| tokens | h | V | chunk | fused ms | PyTorch path ms | speed-up | GEMMs alone ms | unchunked ms "
        "| peak GiB fused / PyTorch | loss max diff | grad rel diff (hidden / weight) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plain = f"{r['plain_ms']:.1f}" if r["plain_ms"] is not None else "-"
        lines.append(
            f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['chunk']} | {r['fused_ms']:.1f} | "
            f"{r['torch_ms']:.1f} | {r['torch_ms'] / r['fused_ms']:.2f}x | {r['gemm_floor_ms']:.1f} | {plain} | "
            f"{r['fused_peak_gib']:.2f} / {r['torch_peak_gib']:.2f} | {r['loss_max_diff']:.1e} | "
            f"{r['grad_hidden_rel_diff']:.1e} / {r['grad_weight_rel_diff']:.1e} |"
        )
    return "\n".join(lines + ["", f"    {meta['command']}", ""])


if __name__ == "__main__":
    main()
