"""Benchmark the dilated attention backends on one GPU against dense causal cuDNN attention.

For each head size, pattern set and length N: each backend's forward and forward+backward time
(CUDA events, median), useful TFLOP/s and peak memory, with dense causal attention (PyTorch SDPA on
cuDNN) at the same N as the baseline, in the same process. Prints a table, and writes JSON and a
markdown table (by default benchmarks/attention.json and benchmarks/attention.md).

Useful work, per head and pattern (w, r): (N / r) queries, each against min(w, N) / r keys; causal
halves it; 4 * D FLOPs per query-key pair forward, x 3.5 for forward plus backward (the usual count
for attention: backward is 2.5 forwards).

    python tools/bench_attention.py                                  # the full sweep
    python tools/bench_attention.py --n 131072 --sets geometric --backends sdpa-cudnn --head-dims 128
    python tools/bench_attention.py --n 1048576 --sets geometric --backends sdpa --doc-lens 4096,65536
    python tools/bench_attention.py --render a.json b.json   # merge runs into --out-json and --out-md

Backends: any name of ``backend_names()``; ``triton-fused`` is the fused kernel (all patterns in one
pass), ``triton`` the project's per-call kernel, ``fa4`` FlashAttention-4 (a backend that is not
installed, or does not take the first head size and dtype, is reported and left out).

Document masking (``--doc-lens``): each backend runs again on packed documents of random lengths,
uniform in [L/2, 3L/2] for each mean length L (so boundaries fall anywhere in the segments). One
``Documents`` serves all repetitions, as one serves every layer of a training step; ``layout ms`` is
what computing its per-call layouts costs once (a fresh one's forward minus the timed forward). The
useful FLOPs are the unmasked ones, so TFLOP/s compare times with the unmasked rows; ``vs unmasked``
is the unmasked fwd+bwd time over the masked one, same backend.

Pattern sets: ``geometric`` w = 2048 * 2^k, r = 2^k, k = 0..4; ``paper`` w = 2048..32768,
r = (1, 2, 4, 6, 12); ``fullrange`` k = 0 .. up to w = N (grows with N, the paper's scaling figure).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longnet_megatron.attention import (  # noqa: E402
    DilatedAttentionConfig,
    GraphedDilatedAttention,
    UnsupportedInputError,
    dilated_attention,
    get_backend,
)
from longnet_megatron.attention.backends import WHOLE_FUNCTION_BACKENDS  # noqa: E402
from longnet_megatron.attention.documents import Documents  # noqa: E402
from longnet_megatron.attention.graphs import GraphedAttention  # noqa: E402

DEFAULT_N = [8192, 16384, 32768, 131072, 524288, 1048576]
SETS = ("geometric", "paper", "fullrange")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 1 << 30


def pattern_set(name: str, n: int, base: int = 2048) -> DilatedAttentionConfig:
    """The named pattern set (causal) at sequence length ``n`` (``base``: fullrange's first segment)."""
    if name == "geometric":
        return DilatedAttentionConfig.geometric(2048, 5)
    if name == "paper":
        return DilatedAttentionConfig.paper()
    if name == "fullrange":
        return DilatedAttentionConfig.geometric(base, 64, max_segment=max(n, base))
    raise ValueError(f"unknown pattern set {name!r}; choose from {SETS}")


def useful_flops(config: DilatedAttentionConfig, n: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of the useful work: per head and pattern, (N/r) queries x (min(w, N)/r) keys."""
    pairs = sum((n / r) * (min(w, n) / r) for w, r in config.patterns)
    return 4.0 * head_dim * heads * pairs * (0.5 if config.causal else 1.0)


def time_ms(fn: Callable[[], object], target_s: float, max_reps: int) -> tuple[float, int]:
    """Median time of ``fn`` in ms over a number of repetitions fitted to ``target_s`` (after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start_all < target_s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), len(times)


def _profile(fn: Callable[[], object]) -> None:
    """Print the GPU kernels of one call of ``fn`` (after a warm-up), and how busy it kept the GPU.

    Wall ms against the summed kernel time says whether the call is bound by the GPU or by the host
    (Python and launches: short sequences); the table names the kernels that take the GPU's time.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    print(
        f"profile: wall {wall_ms:.2f} ms (profiled), GPU kernels {busy_ms:.2f} ms, {launches} kernel launches"
    )
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=24, max_name_column_width=70))


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated memory (GiB) during ``fn``, counting what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GiB


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
    return out.transpose(1, 2)


def _graph_modes(args: argparse.Namespace, n: int) -> tuple[bool, ...]:
    """Eager, and with --cuda-graph (up to --cuda-graph-max-n) also replayed from CUDA graphs."""
    return (False, True) if args.cuda_graph and n <= args.cuda_graph_max_n else (False,)


def _label(name: str, graph: bool) -> str:
    return f"{name}+graph" if graph else name


def measure(
    attend: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], args: argparse.Namespace
) -> dict[str, float | int]:
    """Forward and forward+backward times (ms) and the peak memory (GiB) of one attention function."""
    q, k, v, dout = tensors

    def forward() -> None:
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward() -> None:
        out = attend(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    if args.profile:
        _profile(forward_backward)
    fwd, fwd_reps = time_ms(forward, args.target_s, args.max_reps)
    both, both_reps = time_ms(forward_backward, args.target_s, args.max_reps)
    return {"fwd_ms": fwd, "fwdbwd_ms": both, "peak_gib": peak_gib(forward_backward), "reps": both_reps}


def packed_documents(n: int, mean: int, seed: int) -> torch.Tensor:
    """``[1, n]`` ids of documents of random lengths, uniform in [mean/2, 3*mean/2] (on the GPU)."""
    gen = torch.Generator().manual_seed(seed)
    half = max(1, mean // 2)
    lengths = torch.randint(half, 3 * half + 1, (n // half + 1,), generator=gen)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]
    return ids[None].cuda()


def layout_ms(
    attend: Callable[..., torch.Tensor], tensors: tuple, docs: torch.Tensor, warm_ms: float
) -> float:
    """What a fresh Documents' per-call layouts cost once: its forward's time minus the warm one's."""
    q, k, v, _ = tensors
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        attend(q, k, v, Documents(docs))
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) - warm_ms


def run_one(
    label: str,
    attend: Callable[..., torch.Tensor],
    tensors: tuple,
    flops: float,
    args: argparse.Namespace,
    docs: torch.Tensor | None = None,
) -> dict:
    """One row of results; OOM and kernel errors are recorded, not raised."""
    row: dict = {"backend": label, "useful_fwd_flops": flops}
    try:
        if docs is not None:
            documents = Documents(docs)
            masked, attend = attend, lambda q, k, v: masked(q, k, v, documents)
        row.update(measure(attend, tensors, args))
        if docs is not None:
            row["layout_ms"] = layout_ms(masked, tensors, docs, row["fwd_ms"])
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except (RuntimeError, ValueError) as err:
        row["status"] = f"error: {str(err).splitlines()[0][:200]}"
    torch.cuda.empty_cache()
    return row


def sweep(args: argparse.Namespace) -> list[dict]:
    """All measurements asked for on the command line."""
    rows: list[dict] = []
    dtype = DTYPES[args.dtype]
    t_start = time.perf_counter()
    for d in args.head_dims:
        for n in args.n:
            if time.perf_counter() - t_start > args.time_budget:
                rows.append({"head_dim": d, "n": n, "backend": "*", "status": "skipped: time budget"})
                continue
            gen = torch.Generator(device="cuda").manual_seed(n + d)
            shape = (1, n, args.heads, d)
            try:
                tensors = tuple(
                    torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4)
                )
            except torch.OutOfMemoryError:
                rows.append({"head_dim": d, "n": n, "backend": "*", "status": "OOM (inputs)"})
                continue
            for t in tensors[:3]:
                t.requires_grad_(True)
            base = {"head_dim": d, "n": n, "heads": args.heads, "dtype": args.dtype}
            if args.dense and n <= args.dense_max_n:
                flops = 4.0 * d * args.heads * n * n * 0.5
                for graph in _graph_modes(args, n):
                    row = {**base, "set": "dense", **({"graph": True} if graph else {})}
                    attend = GraphedAttention(_dense) if graph else _dense
                    rows.append(
                        {**row, **run_one(_label("dense-cudnn", graph), attend, tensors, flops, args)}
                    )
                    _print_row(rows[-1])
            for set_name in args.sets:
                config = pattern_set(set_name, n)
                flops = useful_flops(config, n, args.heads, d)
                for name in args.backends:
                    for doc_len in [0, *args.doc_lens]:
                        for graph in _graph_modes(args, n) if not doc_len else (False,):
                            row = {**base, "set": set_name, "patterns": [list(p) for p in config.patterns]}
                            if name == "sdpa":
                                row["kernel"] = get_backend("sdpa").select(tensors[0])
                            docs = None
                            if doc_len:
                                row["doc_len"] = doc_len
                                docs = packed_documents(n, doc_len, seed=n + doc_len)
                            if graph:
                                row["graph"] = True
                                attend = GraphedDilatedAttention(
                                    config, name, pack_whole_plan=args.graph_plan_packing
                                )
                            else:

                                def attend(q, k, v, documents=None, config=config, name=name):
                                    return dilated_attention(
                                        q, k, v, config, backend=name, document_ids=documents
                                    )

                            row.update(run_one(_label(name, graph), attend, tensors, flops, args, docs))
                            rows.append(row)
                            _print_row(row)
                            del attend  # a graphed module's memory pool goes with it
            del tensors
            torch.cuda.empty_cache()
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_row(row: dict) -> None:
    docs = f"docs {row['doc_len']}" if row.get("doc_len") else "unmasked"
    print(
        f"D={row['head_dim']:<4} N={row['n']:<8} {row.get('set', ''):<9} {row['backend']:<15} {docs:<10} "
        f"fwd {_fmt(row.get('fwd_ms'), 2):>9} ms {_fmt(row.get('fwd_tflops')):>6} TF/s | "
        f"fwd+bwd {_fmt(row.get('fwdbwd_ms'), 2):>9} ms {_fmt(row.get('fwdbwd_tflops')):>6} TF/s | "
        f"peak {_fmt(row.get('peak_gib'), 2):>6} GiB  {row.get('status', '')}",
        flush=True,
    )


def render_markdown(runs: list[dict], rows: list[dict]) -> str:
    """A markdown report: how each run was made, then one table per head size and pattern set."""
    dense = {
        (r["head_dim"], r["n"], r.get("run"), bool(r.get("graph"))): r
        for r in rows
        if r.get("backend", "").startswith("dense-cudnn") and r.get("status") == "ok"
    }
    lines = ["# Dilated attention benchmark", ""]
    for i, meta in enumerate(runs, 1):
        lines.append(
            f"* run {i}{' (' + meta['ref'] + ')' if meta.get('ref') else ''}: {meta['device']}, {meta['date']}; "
            f"torch {meta['torch']}, cuDNN {meta['cudnn']}, "
            f"Transformer Engine {meta.get('transformer_engine') or 'not installed'}; "
            f"`{meta['command']}`"
        )
    lines += [
        f"* batch 1, {runs[0]['heads']} heads, {runs[0]['dtype']}, causal; time = median of CUDA-event timings",
        "* useful TFLOP/s: per head and pattern (N/r) queries x (min(w,N)/r) keys, causal halves, x3.5 for fwd+bwd",
        "* peak = torch.cuda.max_memory_allocated during one fwd+bwd, inputs (q, k, v, dout) included",
        "* vs dense = dense causal cuDNN attention (PyTorch SDPA) fwd+bwd time / this fwd+bwd time, "
        "same N, same process; '+graph' rows (fwd+bwd replayed from CUDA graphs, the fwd column eager) "
        "against dense replayed the same way",
        "* docs = mean document length with document masking (lengths uniform in [L/2, 3L/2]; '-': "
        "unmasked); vs unmasked = the same backend's unmasked fwd+bwd time / this one; layout ms = "
        "computing the per-call document layouts once per batch (shared by every layer)",
        "",
    ]
    unmasked = {
        (r["head_dim"], r["n"], r.get("set"), r.get("backend"), r.get("run")): r
        for r in rows
        if not r.get("doc_len") and r.get("status") == "ok"
    }
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("set") not in (None, "dense"):
            groups.setdefault((r["head_dim"], r["set"]), []).append(r)
    for (d, set_name), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], SETS.index(kv[0][1]))):
        patterns = group[0]["patterns"]
        title = f"## D = {d}, {set_name}" + ("" if set_name == "fullrange" else f": (w, r) = {patterns}")
        lines += [
            title,
            "",
            "| N | backend | docs | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB | vs dense | "
            "vs unmasked | layout ms | run | status |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        ns = {r["n"] for r in group}
        group = group + [r for r in rows if r.get("set") == "dense" and r["head_dim"] == d and r["n"] in ns]
        order = lambda r: (r.get("n", 0), r.get("run", 1), r.get("backend", ""), r.get("doc_len") or 0)  # noqa: E731
        for r in sorted(group, key=order):
            ref = dense.get((r.get("head_dim"), r.get("n"), r.get("run"), bool(r.get("graph"))))
            speed = masked = None
            if ref and r.get("status") == "ok" and not r["backend"].startswith("dense-cudnn"):
                speed = ref["fwdbwd_ms"] / r["fwdbwd_ms"]
            plain = unmasked.get((r["head_dim"], r["n"], r.get("set"), r.get("backend"), r.get("run")))
            if r.get("doc_len") and plain and r.get("status") == "ok":
                masked = plain["fwdbwd_ms"] / r["fwdbwd_ms"]
            name = r["backend"] + (f" ({r['kernel']})" if r.get("kernel") else "")
            lines.append(
                f"| {r.get('n')} | {name} | {r.get('doc_len') or '-'} | {_fmt(r.get('fwd_ms'), 2)} | "
                f"{_fmt(r.get('fwd_tflops'))} | {_fmt(r.get('fwdbwd_ms'), 2)} | {_fmt(r.get('fwdbwd_tflops'))} | "
                f"{_fmt(r.get('peak_gib'), 2)} | {_fmt(speed) + 'x' if speed else '-'} | "
                f"{_fmt(masked, 2) + 'x' if masked else '-'} | {_fmt(r.get('layout_ms'))} | {r.get('run', 1)} | "
                f"{r.get('status', '')} |"
            )
        lines.append("")
    lines += [f"* D = {r['head_dim']}, N = {r['n']}: {r['status']}" for r in rows if r.get("backend") == "*"]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    try:
        import transformer_engine

        te = transformer_engine.__version__
    except Exception:  # noqa: BLE001 - any failure means "not available"
        te = None
    try:  # TE's own cuDNN libraries can make PyTorch's version check fail; the kernels still run
        cudnn = torch.backends.cudnn.version()
    except RuntimeError as err:
        cudnn = f"unavailable to torch ({str(err)[:80]})"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cudnn": cudnn,
        "transformer_engine": te,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--n", type=ints, default=DEFAULT_N, help="sequence lengths, comma-separated")
    p.add_argument("--head-dims", type=ints, default=[128, 64])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sets", type=lambda s: s.split(","), default=list(SETS), help=f"from {SETS}")
    p.add_argument("--backends", type=lambda s: s.split(","), default=["te", "sdpa"])
    p.add_argument(
        "--doc-lens",
        type=ints,
        default=[],
        help="also run each backend with document masking on documents of these mean lengths "
        "(useful FLOPs are counted without masking, so TFLOP/s compare times with the unmasked rows)",
    )
    p.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense baseline")
    p.add_argument("--dense-max-n", type=int, default=131072, help="longest N for the dense baseline")
    p.add_argument("--target-s", type=float, default=0.3, help="seconds of timed repetitions per number")
    p.add_argument("--max-reps", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="stop starting new N after this")
    p.add_argument("--profile", action="store_true", help="print a profile of each fwd+bwd")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time each backend (and dense) with fwd+bwd replayed from CUDA graphs "
        "(GraphedDilatedAttention; the forward-only time stays eager); rows '<name>+graph'",
    )
    p.add_argument("--cuda-graph-max-n", type=int, default=131072, help="longest N graphed with --cuda-graph")
    p.add_argument(
        "--graph-plan-packing",
        action="store_true",
        help="graphed rows: pack short plans whole (GraphedDilatedAttention(pack_whole_plan=True); off by default)",
    )
    p.add_argument("--merge-block", type=int, default=None, help="override deferred.BLOCK_ROWS")
    p.add_argument("--merge-warps", type=int, default=None, help="override deferred.NUM_WARPS")
    p.add_argument("--pack-below", type=int, default=None, help="override packing.PACK_BELOW (tuning)")
    p.add_argument("--pack-plan-below", type=int, default=None, help="override packing.PACK_PLAN_BELOW")
    p.add_argument(
        "--merge",
        choices=["deferred", "fused", "torch"],
        default="deferred",
        help="the forward's merge: deferred (one pass at the end, where the plan fits), fused (online, "
        "one kernel per call), torch (online, PyTorch ops)",
    )
    p.add_argument("--ref", default=None, help="what code this is (e.g. a commit), shown with the run")
    p.add_argument("--out-json", default="benchmarks/attention.json")
    p.add_argument("--out-md", default="benchmarks/attention.md")
    p.add_argument(
        "--render", nargs="+", metavar="JSON", help="only merge these runs into --out-json/--out-md"
    )
    args = p.parse_args(argv)

    if args.render:
        docs = [json.loads(Path(f).read_text()) for f in args.render]
        runs, rows = [], []
        for doc in docs:  # rows keep the number of the run they came from
            first = len(runs) + 1
            runs += doc.get("runs", [doc.get("meta")])
            rows += [{**r, "run": r.get("run", 1) + first - 1} for r in doc["rows"]]
        Path(args.out_md).write_text(render_markdown(runs, rows))
        merged = {"runs": runs, "rows": rows}
        Path(args.out_json).write_text(json.dumps(merged, indent=1))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device")
    _apply_knobs(args)
    probe = torch.zeros(1, 64, 1, args.head_dims[0], device="cuda", dtype=DTYPES[args.dtype])
    args.backends = [b for b in args.backends if _usable(b, probe)]
    meta = {
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": args.dtype,
        "heads": args.heads,
        "command": "python tools/bench_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        **({"ref": args.ref} if args.ref else {}),
    }
    print(f"{meta['device']}: torch {meta['torch']}, cuDNN {meta['cudnn']}, TE {meta['transformer_engine']}")
    rows = sweep(args)
    for path in (args.out_json, args.out_md):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps({"runs": [meta], "rows": rows}, indent=1))
    Path(args.out_md).write_text(render_markdown([meta], rows))


def _apply_knobs(args: argparse.Namespace) -> None:
    """The tuning overrides, where this version of the library has them."""
    from longnet_megatron.attention import packing

    if args.pack_below is not None:
        packing.PACK_BELOW = args.pack_below
    if args.pack_plan_below is not None:
        packing.PACK_PLAN_BELOW = args.pack_plan_below
    if args.merge_block is not None or args.merge_warps is not None:
        from longnet_megatron.attention import deferred

        deferred.BLOCK_ROWS = args.merge_block or deferred.BLOCK_ROWS
        deferred.NUM_WARPS = args.merge_warps or deferred.NUM_WARPS
    if args.merge != "deferred":
        try:
            from longnet_megatron.attention import deferred
        except ImportError:  # older versions merge online only
            deferred = None
        if deferred is not None:
            deferred.ENABLED = False
    if args.merge == "torch":
        try:
            from longnet_megatron.attention import merge
        except ImportError:  # older versions merge in PyTorch ops only
            return
        merge.FUSED = False


def _usable(name: str, probe: torch.Tensor) -> bool:
    """Whether backend ``name`` loads here and takes tensors like ``probe`` (else reported and left out)."""
    try:
        if name in WHOLE_FUNCTION_BACKENDS:
            importlib.import_module(WHOLE_FUNCTION_BACKENDS[name])
        else:
            get_backend(name, probe)
        return True
    except (ImportError, OSError, RuntimeError, UnsupportedInputError) as err:
        print(f"backend {name} left out: {err}")
        return False


if __name__ == "__main__":
    main()
