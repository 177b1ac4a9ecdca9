"""Benchmark LongNet's context-parallel dilated attention: weak scaling and the longest sequence.

One attention layer, forward and forward+backward, on random bf16 q, k, v ``[1, N / G, heads, D]`` per
rank, with LongNet's scaling-experiment patterns w_k = base * 2^k, r_k = 2^k for every w_k <= N (so the
largest segments span all G ranks and w / r stays fixed). Per row: sequence length, tokens per GPU,
median forward and forward+backward time (CUDA events, slowest rank), peak memory (largest rank),
bytes the busiest rank sent (k, v forward plus dk, dv backward), and the weak-scaling ratio
``fwd+bwd(G) / fwd+bwd(1)`` at the same tokens per GPU.

    # whole table from one 4-GPU launch (rows for G = 1, 2, 4 run on ranks [0, G); the rest wait)
    torchrun --nproc-per-node=4 tools/bench_cp.py --mode both
    # or one launch per GPU count, merged into the same table
    torchrun --nproc-per-node=1 tools/bench_cp.py --mode weak --append
    torchrun --nproc-per-node=2 tools/bench_cp.py --mode weak --append
    torchrun --nproc-per-node=4 tools/bench_cp.py --mode both --world-sizes 4 --append
    # tiny CPU smoke run (gloo), not a measurement
    torchrun --nproc-per-node=2 tools/bench_cp.py --device cpu --tokens-per-gpu 2048 --heads 2 --head-dim 16 --base-segment 256 --min-tokens 4096 --max-tokens 8192 --dtype fp32 --out /tmp/cp_smoke

Out-of-memory is caught per row and reported (the longest-sequence sweep stops at the first one);
results are written after every row to ``--out``.json and ``--out``.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# NVLink SHARP / multicast objects are not available on every machine this runs on (KINDS.md).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longnet_megatron.attention import DilatedAttentionConfig, dilated_attention  # noqa: E402
from longnet_megatron.attention.cp import last_comm_stats  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    """One measured configuration."""

    mode: str
    gpus: int
    seq_len: int
    tokens_per_gpu: int
    num_patterns: int
    max_segment: int
    status: str = "ok"
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_gib: float | None = None
    bytes_sent_per_rank: int | None = None
    bytes_by_pattern: dict[str, int] | None = None
    weak_scaling_ratio: float | None = None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["weak", "longest", "both"], default="both")
    p.add_argument("--world-sizes", default=None, help="comma list of G (default: powers of 2 up to WORLD)")
    p.add_argument("--tokens-per-gpu", type=int, default=512 * 1024, help="weak scaling: N / G")
    p.add_argument("--min-tokens", type=int, default=1024 * 1024, help="longest: first N tried")
    p.add_argument("--max-tokens", type=int, default=4 * 1024 * 1024, help="longest: last N tried")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--base-segment", type=int, default=2048, help="w_0; w_k = w_0 * 2^k, r_k = 2^k")
    p.add_argument("--no-causal", action="store_true", help="bidirectional attention (default causal)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", help="auto, fa4, sdpa, te, triton or reference")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--timeout-min", type=float, default=5.0, help="collective timeout (a hung row dies)")
    p.add_argument("--out", default="benchmarks/cp", help="writes OUT.json and OUT.md")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT.json")
    return p.parse_args()


def patterns_for(n_total: int, base: int, causal: bool) -> DilatedAttentionConfig:
    """LongNet's scaling-experiment patterns up to the whole sequence."""
    count = max(1, int(math.log2(max(1, n_total // base))) + 1)
    return DilatedAttentionConfig.geometric(base, num_patterns=count, max_segment=n_total, causal=causal)


class Timer:
    """Elapsed milliseconds of a region: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def _reduce(
    value: float, group: dist.ProcessGroup | None, device: torch.device, op=dist.ReduceOp.MAX
) -> float:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.item()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def describe(err: BaseException) -> str:
    if is_oom(err):
        return "OOM"
    return f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def all_ok(ok: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether every rank of ``group`` succeeded; also the barrier between timed steps."""
    return _reduce(1.0 if ok else 0.0, group, device, op=dist.ReduceOp.MIN) == 1.0


def measure(
    args: argparse.Namespace, row: Row, group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Fill ``row`` with timings, memory and bytes (or its failure) on the ranks of ``group``.

    Every timed step ends with an agreement on success, so a rank that runs out of memory makes all
    ranks stop the row together (a failure in the middle of a step's messages can still hang until
    the process-group timeout).
    """
    rank = dist.get_rank(group) if group is not None else 0
    n = row.seq_len // row.gpus
    hkv = args.kv_heads or args.heads
    config = patterns_for(row.seq_len, args.base_segment, not args.no_causal)
    dtype = DTYPES[args.dtype]
    state: dict[str, torch.Tensor] = {}

    def make_inputs() -> None:
        gen = torch.Generator(device=device).manual_seed(1234 + rank)
        for name, heads in (("q", args.heads), ("k", hkv), ("v", hkv), ("dout", args.heads)):
            shape = (1, n, heads, args.head_dim)
            state[name] = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        for name in ("q", "k", "v"):
            state[name].requires_grad_(True)

    def attend() -> torch.Tensor:
        return dilated_attention(
            state["q"], state["k"], state["v"], config, position_offset=rank * n, backend=args.backend,
            cp_group=group,
        )  # fmt: skip

    def forward() -> None:
        with torch.no_grad():
            attend()

    def forward_backward() -> None:
        attend().backward(state["dout"])
        for name in ("q", "k", "v"):
            state[name].grad = None

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {"fwd": [], "fwd_bwd": []}
    failure = ""
    steps = [("setup", make_inputs)]
    for i in range(args.warmup + args.iters):
        steps += [
            ("fwd" if i >= args.warmup else "", forward),
            ("fwd_bwd" if i >= args.warmup else "", forward_backward),
        ]
    for kind, step in steps:
        try:
            with Timer(device) as timer:
                step()
        except Exception as err:  # noqa: BLE001 - one failed row is reported, the sweep goes on
            failure = describe(err)
        if not all_ok(not failure, group, device):
            break
        if kind in times:
            times[kind].append(timer.ms)
    if failure or len(times["fwd_bwd"]) < args.iters:
        row.status = failure or "failed on another rank"
    else:
        stats = last_comm_stats() if group is not None else None
        per_pattern = [0.0] * len(config.patterns)
        for table in (stats.forward_bytes, stats.backward_bytes) if stats else ():
            for pattern, count in table.items():
                per_pattern[pattern] += count
        row.fwd_ms = _reduce(statistics.median(times["fwd"]), group, device)
        row.fwd_bwd_ms = _reduce(statistics.median(times["fwd_bwd"]), group, device)
        row.bytes_sent_per_rank = int(_reduce(sum(per_pattern), group, device))
        row.bytes_by_pattern = {
            f"w={w},r={r}": int(_reduce(b, group, device)) for (w, r), b in zip(config.patterns, per_pattern)
        }
        if device.type == "cuda":
            row.peak_gib = _reduce(torch.cuda.max_memory_allocated() / 2**30, group, device)
    state.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"# Context-parallel dilated attention ({meta['device']}, {meta['dtype']}, backend {meta['backend']})",
        "",
        f"One layer, {meta['heads']} heads (kv {meta['kv_heads']}), D = {meta['head_dim']}, "
        f"{'causal' if meta['causal'] else 'bidirectional'}, patterns w_k = {meta['base_segment']} * 2^k, "
        f"r_k = 2^k up to w = N. Times: median of {meta['iters']} iterations, slowest rank. "
        "Bytes: k, v sent forward plus dk, dv sent backward by the busiest rank.",
        "",
        "| mode | GPUs | N | tokens/GPU | patterns | fwd ms | fwd+bwd ms | peak GiB | bytes sent/rank | "
        "weak-scaling ratio | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.gpus} | {r.seq_len:,} | {r.tokens_per_gpu:,} | {r.num_patterns} | "
            f"{fmt(r.fwd_ms, '.1f')} | {fmt(r.fwd_bwd_ms, '.1f')} | {fmt(r.peak_gib, '.1f')} | "
            f"{fmt(r.bytes_sent_per_rank, ',')} | {fmt(r.weak_scaling_ratio, '.3f')} | {r.status} |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def save(rows: list[Row], meta: dict[str, Any], out: str, append: bool) -> list[Row]:
    """Merge with earlier rows when appending, recompute weak-scaling ratios, write JSON and markdown."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[tuple, Row] = {}
    if append and path.with_suffix(".json").exists():
        for data in json.loads(path.with_suffix(".json").read_text())["rows"]:
            row = Row(**data)
            merged[(row.mode, row.gpus, row.seq_len)] = row
    for row in rows:
        merged[(row.mode, row.gpus, row.seq_len)] = row
    ordered = sorted(merged.values(), key=lambda r: (r.mode != "weak", r.gpus, r.seq_len))
    single = {r.tokens_per_gpu: r.fwd_bwd_ms for r in ordered if r.mode == "weak" and r.gpus == 1}
    for r in ordered:
        base = single.get(r.tokens_per_gpu)
        r.weak_scaling_ratio = r.fwd_bwd_ms / base if (r.mode == "weak" and base and r.fwd_bwd_ms) else None
    payload = {"meta": meta, "rows": [asdict(r) for r in ordered]}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(ordered, meta))
    return ordered


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:  # plain `python tools/bench_cp.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: pass --device cpu for a smoke run")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=args.timeout_min)
    )
    rank = dist.get_rank()
    sizes = (
        [int(s) for s in args.world_sizes.split(",")]
        if args.world_sizes
        else [2**i for i in range(int(math.log2(world)) + 1)]
    )
    if any(g > world or g < 1 for g in sizes):
        sys.exit(f"--world-sizes {sizes} must lie within 1..{world} (the launched world)")
    # Every rank creates every sub-group, in the same order (a collective over the world).
    groups = {g: dist.new_group(list(range(g))) for g in sorted(set(sizes)) if g > 1}

    plan: list[Row] = []
    if args.mode in ("weak", "both"):
        for g in sizes:
            n_total = args.tokens_per_gpu * g
            cfg = patterns_for(n_total, args.base_segment, not args.no_causal)
            plan.append(
                Row("weak", g, n_total, args.tokens_per_gpu, len(cfg.patterns), cfg.segment_lengths[-1])
            )
    longest = []
    if args.mode in ("longest", "both"):
        g, n_total = max(sizes), args.min_tokens
        while n_total <= args.max_tokens:
            cfg = patterns_for(n_total, args.base_segment, not args.no_causal)
            longest.append(
                Row("longest", g, n_total, n_total // g, len(cfg.patterns), cfg.segment_lengths[-1])
            )
            n_total *= 2

    kv = args.kv_heads or args.heads
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "world": world,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "backend": args.backend,
        "heads": args.heads,
        "kv_heads": kv,
        "head_dim": args.head_dim,
        "base_segment": args.base_segment,
        "causal": not args.no_causal,
        "iters": args.iters,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"torchrun --nproc-per-node={world} {' '.join(sys.argv)}",
    }
    done: list[Row] = []
    stop_longest = False
    for row in plan + longest:
        if row.mode == "longest" and stop_longest:
            row.status = "skipped (shorter length failed)"
        elif rank < row.gpus:
            measure(args, row, groups.get(row.gpus), device)
        # Rank 0 measured every row; its verdict decides for all ranks whether the sweep goes on.
        failed = _reduce(0.0 if row.status == "ok" or rank != 0 else 1.0, dist.group.WORLD, device)
        if row.mode == "longest" and failed:
            stop_longest = True
        done.append(row)
        if rank == 0:
            save(done, meta, args.out, args.append)
            print(
                f"[{row.mode}] G={row.gpus} N={row.seq_len:,}: fwd {fmt(row.fwd_ms, '.1f')} ms, "
                f"fwd+bwd {fmt(row.fwd_bwd_ms, '.1f')} ms, peak {fmt(row.peak_gib, '.1f')} GiB, "
                f"sent {fmt(row.bytes_sent_per_rank, ',')} B, {row.status}",
                flush=True,
            )
    if rank == 0:
        print()
        print(markdown(save(done, meta, args.out, args.append), meta))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
