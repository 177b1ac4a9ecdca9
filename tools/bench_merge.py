"""Benchmark the deferred merge's Triton kernel alone: time and bandwidth for each block size (the (position,
head) rows of a program) and warp count.

The kernel (longnet_megatron/attention/deferred.py) reads the output (the r = 1 pattern's results)
and every other pattern's compact buffer once, and writes the output and the merged log-sum-exp; it is
bound by memory, so GB/s against the GPU's bandwidth says how far it is from its floor. Buffers are
random (finite log-sum-exps), laid out as the real plan lays them out.

    python tools/bench_merge.py --n 131072,1048576 --blocks 16,32,64,128 --warps 2,4,8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longnet_megatron.attention import DilatedAttentionConfig, deferred  # noqa: E402
from longnet_megatron.attention.deferred import DeferredMerge, deferred_layout, merge_fused  # noqa: E402
from longnet_megatron.attention.indexing import plan_tasks  # noqa: E402


def merge_bytes(state: DeferredMerge) -> int:
    """Bytes the merge must move: the output read and written, every buffer read, the LSEs."""
    out, y = state.out, state.y
    lse_bytes = state.base_lse.numel() * 4 * 2 + state.ly.numel() * 4  # base read, merged written, LY read
    return 2 * out.numel() * out.element_size() + y.numel() * y.element_size() + lse_bytes


def time_kernel(state: DeferredMerge, reps: int) -> float:
    """Median ms of one merge (the output is merged again each time: the same work)."""
    b, n, h, _ = state.layout.shape
    others = [p for p in state.layout.patterns.values() if not p.base]
    lse = torch.empty(b, n, h, device="cuda")
    merge_fused(state, others, lse)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        merge_fused(state, others, lse)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--n", type=ints, default=[131072, 1048576])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--patterns", type=int, default=5, help="geometric patterns: w = 2048 * 2^k, r = 2^k")
    p.add_argument("--blocks", type=ints, default=[16, 32, 64, 128])
    p.add_argument("--warps", type=ints, default=[2, 4, 8])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_merge needs a CUDA device")
    config = DilatedAttentionConfig.geometric(2048, args.patterns)
    rows = []
    print(f"{torch.cuda.get_device_name()}, bf16, {args.heads} heads, D = {args.head_dim}, {config.patterns}")
    print(f"{'N':>9} {'block':>6} {'warps':>6} {'ms':>8} {'GB/s':>8}")
    for n in args.n:
        tasks = plan_tasks(config, n, args.heads, args.heads)
        shape = (1, n, args.heads, args.head_dim)
        layout = deferred_layout(tasks, shape)
        q = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        state = DeferredMerge(layout, q, torch.float32)
        for t in (state.out, state.y, state.base_lse, state.ly):
            t.normal_()
        moved = merge_bytes(state)
        for block in args.blocks:
            for warps in args.warps:
                deferred.BLOCK_ROWS, deferred.NUM_WARPS = block, warps
                ms = time_kernel(state, args.reps)
                rows.append({"n": n, "block": block, "warps": warps, "ms": ms, "gb_s": moved / ms / 1e6})
                print(f"{n:>9} {block:>6} {warps:>6} {ms:>8.3f} {moved / ms / 1e6:>8.0f}")
        del state, q
        torch.cuda.empty_cache()
    for n in args.n:
        best = min((r for r in rows if r["n"] == n), key=lambda r: r["ms"])
        print(f"best at N={n}: block {best['block']}, {best['warps']} warps, {best['ms']:.3f} ms")
    if args.out_json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": sys.argv}
        Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
