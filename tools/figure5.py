"""LongNet's Figure 5: fwd+bwd runtime of dilated against dense (vanilla) attention from 8K to 1B tokens.

MEASURED on the GPU this runs on (bf16, batch 1, causal; patterns w = base * 2^k, r = 2^k up to w = N,
bench_attention's ``fullrange`` set): dilated attention with each backend at N = 8K, 16K, ... up to the
longest N that fits (an out-of-memory error ends the series), and dense causal cuDNN attention while one
fwd+bwd is predicted (quadratic trend) to stay under ``--dense-limit-s``. Warm-up excluded, median of up
to ``--max-reps`` repetitions (fewer at large N), every step inside ``--budget-s``.

MODELLED up to 2^30 tokens, calibrated on those measurements (the output states it again):

* dense: t = a N^2 + b N, least squares (relative) on the measured points. Past one GPU's tokens the
  work is split ideally over the same number of GPUs as the dilated column, with no communication
  (a lower bound for dense).
* dilated, one GPU: the useful FLOPs of the schedule at N times the measured seconds per useful FLOP
  at the calibration point (the longest N every backend measured, = tokens per GPU).
* dilated, N > tokens per GPU: LongNet's context parallelism (docs/design.md section 4) on
  P = N / tokens-per-GPU ranks: the busiest rank's useful FLOPs (its local patterns and its queries
  against the keys it receives, counted from ``cp.plan_context_parallel``) at the same seconds per
  FLOP, plus the bytes it sends (k, v forward, dk, dv backward, the plan's message sizes) over an
  ASSUMED link bandwidth (``--link-gb-s``, default 400 GB/s, NVLink class), not overlapped.

Writes OUT.json (measurements, model, points), OUT.md (table) and OUT.png (log-log; measured points as
markers, modelled ones as dashed lines). ``--model-only --from OUT.json`` re-renders from saved
measurements without a GPU.

    python tools/figure5.py --budget-s 150 --out $OUT/figure5
    python tools/figure5.py --model-only --from benchmarks/figure5.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longnet_megatron.attention import DilatedAttentionConfig, dilated_attention, get_backend  # noqa: E402
from longnet_megatron.attention.backends import UnsupportedInputError  # noqa: E402
from longnet_megatron.attention.cp.plan import plan_context_parallel  # noqa: E402
from longnet_megatron.checkpoint.files import write_atomic  # noqa: E402
from longnet_megatron.eval.plots import _pyplot, _save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import DTYPES, _dense, _versions, pattern_set, time_ms, useful_flops  # noqa: E402

MAX_N = 1 << 30
FWD_BWD = 3.5  # fwd+bwd FLOPs per forward FLOP (bench_attention's count)
MEASURED, MODELLED = "measured", "modelled"
ELEMENT_BYTES = {"bf16": 2, "fp16": 2}
DENSE = "dense-cudnn"


# -- measuring ---------------------------------------------------------------------------------------
def _doubling(start: int, stop: int) -> list[int]:
    ns, n = [], start
    while n <= stop:
        ns.append(n)
        n *= 2
    return ns


def default_backends() -> list[str]:
    """``sdpa``, and ``fa4`` where FlashAttention-4 imports and takes bf16, D = 128 here."""
    names = ["sdpa"]
    try:
        get_backend("fa4", torch.zeros(1, 64, 1, 128, device="cuda", dtype=torch.bfloat16))
        names.append("fa4")
    except (ImportError, OSError, RuntimeError, UnsupportedInputError) as err:
        print(f"fa4 left out: {err}", flush=True)
    return names


def _fwd_bwd(attend: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    q, k, v, dout = tensors

    def run() -> None:
        torch.autograd.grad(attend(q, k, v), (q, k, v), dout)

    return run


def _cost_s(predicted_s: float, args: argparse.Namespace) -> float:
    """Wall time of one point predicted to take ``predicted_s``: warm-up plus the repetitions time_ms makes."""
    reps = min(args.max_reps, max(1, int(args.target_s / max(predicted_s, 1e-9)) + 1))
    return predicted_s * (1 + reps)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """All series on this GPU: ``{"dense": [...], "dilated": {backend: [...]}, "notes": [...]}``.

    The dilated series run first (N ascending, every backend at each N), then dense, so that dense
    attention's long calls spend only what the dilated measurements left of the budget.
    """
    series: dict[str, list[dict]] = {**{b: [] for b in args.backends}, DENSE: []}
    notes: list[str] = []
    start = time.perf_counter()
    for group in (list(args.backends), [DENSE]):
        active = list(group)
        for n in _doubling(args.min_n, args.max_n):
            if not active:
                break
            try:
                tensors = _inputs(n, args)
            except torch.OutOfMemoryError:
                notes += [f"{name}: out of memory allocating the inputs at N={n}" for name in active]
                print(f"  {notes[-1]}", flush=True)
                break
            for name in list(active):
                why = _measure_point(
                    name, n, tensors, series[name], args, args.budget_s - (time.perf_counter() - start)
                )
                if why is not None:
                    active.remove(name)
                    notes.append(f"{name}: {why}")
                    print(f"  {name}: {why}", flush=True)
                else:
                    p = series[name][-1]
                    print(
                        f"[{time.perf_counter() - start:6.1f} s of {args.budget_s:g}] {name:<12} N={n:<10} "
                        f"fwd+bwd {p['fwdbwd_s']:9.4f} s ({p['reps']} reps) "
                        f"{FWD_BWD * p['flops'] / p['fwdbwd_s'] / 1e12:6.1f} useful TFLOP/s",
                        flush=True,
                    )
            del tensors
            torch.cuda.empty_cache()
    return {"dense": series[DENSE], "dilated": {b: series[b] for b in args.backends}, "notes": notes}


def _inputs(n: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """q, k, v (requiring gradients) and dout ``[1, n, heads, head_dim]``, random."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    shape = (1, n, args.heads, args.head_dim)
    tensors = tuple(
        torch.randn(shape, device="cuda", dtype=DTYPES[args.dtype], generator=gen) for _ in range(4)
    )
    for t in tensors[:3]:
        t.requires_grad_(True)
    return tensors


def _measure_point(
    name: str,
    n: int,
    tensors: tuple[torch.Tensor, ...],
    done: list[dict],
    args: argparse.Namespace,
    left_s: float,
) -> str | None:
    """Append series ``name``'s point at ``n`` to ``done``; or return why the series stops here."""
    if name == DENSE:
        flops = 0.5 * 4 * args.head_dim * args.heads * n * n
        attend = _dense
    else:
        config = pattern_set("fullrange", n, args.base_segment)
        flops = useful_flops(config, n, args.heads, args.head_dim)

        def attend(q, k, v):
            return dilated_attention(q, k, v, config, backend=name)

    predicted = done[-1]["fwdbwd_s"] * flops / done[-1]["flops"] if done else 0.0
    if name == DENSE and predicted > args.dense_limit_s:
        return f"N={n} predicted {predicted:.0f} s > --dense-limit-s {args.dense_limit_s:g}"
    if _cost_s(predicted, args) > left_s:
        return f"N={n} skipped: predicted {_cost_s(predicted, args):.0f} s, {max(left_s, 0):.0f} s of budget left"
    try:
        ms, reps = time_ms(_fwd_bwd(attend, tensors), args.target_s, args.max_reps)
    except torch.OutOfMemoryError:
        return f"out of memory at N={n}"
    except (RuntimeError, ValueError) as err:
        return f"error at N={n}: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.empty_cache()
    done.append({"n": n, "fwdbwd_s": ms / 1000, "reps": reps, "flops": flops})
    return None


# -- modelling ---------------------------------------------------------------------------------------
def fit_dense(points: list[dict]) -> tuple[float, float]:
    """``(a, b)`` of t = a N^2 + b N, least squares on relative error (one point: b = 0)."""
    if not points:
        raise ValueError("no dense point was measured: nothing to fit the dense model on")
    if len(points) == 1:
        p = points[0]
        return p["fwdbwd_s"] / p["n"] ** 2, 0.0
    rows = torch.tensor(
        [[p["n"] ** 2 / p["fwdbwd_s"], p["n"] / p["fwdbwd_s"]] for p in points], dtype=torch.float64
    )
    a, b = (
        torch.linalg.lstsq(rows, torch.ones(len(points), 1, dtype=torch.float64)).solution.flatten().tolist()
    )
    return a, b


def rank_cost(
    config: DilatedAttentionConfig,
    tokens_per_rank: int,
    rank: int,
    ranks: int,
    heads: int,
    head_dim: int,
    element_bytes: int,
) -> tuple[float, int]:
    """CP rank ``rank``'s useful forward FLOPs and the bytes it sends (k, v forward plus dk, dv backward).

    Useful FLOPs as ``useful_flops`` counts them (local causal squares halved, received keys in full);
    bytes from the plan's ``CrossingSegment.message_numel``, one message per (pattern, peer).
    """
    plan = plan_context_parallel(
        config, tokens_per_rank, heads, heads, head_offset=0, position_offset=rank * tokens_per_rank,
        cp_rank=rank, cp_size=ranks,
    )  # fmt: skip
    pairs = sum(
        t.query.rows.num_segments * t.query.rows.length * t.key_value.rows.length * t.query.num_heads(heads)
        for t in plan.tasks
    ) * (0.5 if config.causal else 1.0)
    sent = 0
    for seg in plan.crossing:
        sent += seg.message_numel(rank, 1, head_dim) * len(seg.targets)  # k, v to each reader
        sent += sum(seg.message_numel(m, 1, head_dim) for m in seg.sources)  # dk, dv to each owner
        for off in seg.offsets:
            if off.query is not None:
                remote = sum(off.rows[seg.members.index(m)] for m in seg.sources)
                pairs += (
                    off.query.rows.num_segments * off.query.rows.length * remote * off.query.num_heads(heads)
                )
    return 4.0 * head_dim * pairs, sent * element_bytes


def busiest_rank(
    config: DilatedAttentionConfig,
    tokens_per_rank: int,
    ranks: int,
    heads: int,
    head_dim: int,
    element_bytes: int,
) -> dict[str, float]:
    """The largest :func:`rank_cost` FLOPs and bytes over ranks 0, P/4, P/2, 3P/4, P-1 (all when P <= 8)."""
    sample = range(ranks) if ranks <= 8 else sorted({0, ranks // 4, ranks // 2, 3 * ranks // 4, ranks - 1})
    costs = [rank_cost(config, tokens_per_rank, r, ranks, heads, head_dim, element_bytes) for r in sample]
    return {"flops": max(c[0] for c in costs), "bytes": float(max(c[1] for c in costs))}


def _measured(seconds: float, gpus: int) -> dict[str, Any]:
    """A measured cell; measured on one GPU even where the row's model spreads N over more."""
    return {"s": seconds, "source": MEASURED, **({"gpus": 1} if gpus > 1 else {})}


def model(measured: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Every point from ``meta['min_n']`` to ``meta['model_to']``: measured where it was, else modelled."""
    heads, head_dim, base = meta["heads"], meta["head_dim"], meta["base_segment"]
    dilated = {b: s for b, s in measured["dilated"].items() if s}
    if not dilated:
        raise ValueError("no dilated point was measured: nothing to calibrate the dilated model on")
    per_gpu = meta.get("tokens_per_gpu") or min(max(p["n"] for p in s) for s in dilated.values())
    a, b = fit_dense(measured["dense"])
    calibration = {}
    for name, series in dilated.items():
        point = max((p for p in series if p["n"] <= per_gpu), key=lambda p: p["n"])
        flops = useful_flops(pattern_set("fullrange", point["n"], base), point["n"], heads, head_dim)
        calibration[name] = {"n": point["n"], "s_per_useful_flop": point["fwdbwd_s"] / (FWD_BWD * flops)}
    link = meta["link_gb_s"] * 1e9
    dense_at = {p["n"]: p["fwdbwd_s"] for p in measured["dense"]}
    points = []
    for n in _doubling(meta["min_n"], meta["model_to"]):
        gpus = max(1, n // per_gpu)
        config = pattern_set("fullrange", n, base)
        row: dict[str, Any] = {"n": n, "gpus": gpus}
        if n in dense_at:
            row[DENSE] = _measured(dense_at[n], gpus)
        else:
            row[DENSE] = {"s": (a * n * n + b * n) / gpus, "source": MODELLED}
        costs = None
        if gpus > 1:
            costs = busiest_rank(config, per_gpu, gpus, heads, head_dim, ELEMENT_BYTES[meta["dtype"]])
            row["rank_useful_flops"], row["rank_bytes_sent"] = costs["flops"], costs["bytes"]
        for name, series in dilated.items():
            at = {p["n"]: p["fwdbwd_s"] for p in series}
            rate = calibration[name]["s_per_useful_flop"]
            if n in at:
                row[name] = _measured(at[n], gpus)
            elif costs is None:
                row[name] = {
                    "s": rate * FWD_BWD * useful_flops(config, n, heads, head_dim),
                    "source": MODELLED,
                }
            else:
                row[name] = {"s": rate * FWD_BWD * costs["flops"] + costs["bytes"] / link, "source": MODELLED}
        points.append(row)
    return {
        "tokens_per_gpu": per_gpu,
        "dense_fit": {"a_s_per_token2": a, "b_s_per_token": b},
        "calibration": calibration,
        "points": points,
    }


# -- output ------------------------------------------------------------------------------------------
def _fmt_s(cell: dict) -> str:
    s = cell["s"]
    value = f"{s:.3g}" if s < 1000 else f"{s:,.0f}"
    tag = "model" if cell["source"] == MODELLED else "m, 1 GPU" if cell.get("gpus") else "m"
    return f"{value} ({tag})"


def _tokens(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def model_statement(meta: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """The model in words, with its fitted numbers."""
    fit, per_gpu = result["dense_fit"], result["tokens_per_gpu"]
    rates = ", ".join(
        f"{name} {1 / c['s_per_useful_flop'] / 1e12:.0f} useful TFLOP/s at N={_tokens(c['n'])}"
        for name, c in result["calibration"].items()
    )
    return [
        f"* dense model: t = a N^2 + b N fitted on the measured dense points (a = {fit['a_s_per_token2']:.3e} s, "
        f"b = {fit['b_s_per_token']:.3e} s); past {_tokens(per_gpu)} tokens split ideally over the same GPUs "
        "as dilated, no communication (a lower bound for dense)",
        f"* dilated model, one GPU: useful FLOPs of the schedule at N x measured seconds per useful FLOP ({rates})",
        f"* dilated model, N > {_tokens(per_gpu)} (tokens per GPU): LongNet context parallelism on N / "
        f"{_tokens(per_gpu)} GPUs; busiest sampled rank's useful FLOPs (cp.plan_context_parallel) at the same rate, plus "
        f"its bytes sent (k, v forward, dk, dv backward) over an ASSUMED {meta['link_gb_s']:g} GB/s link, "
        "not overlapped with compute",
    ]


def render_markdown(meta: dict[str, Any], measured: dict[str, Any], result: dict[str, Any]) -> str:
    names = list(result["calibration"])
    lines = [
        "# LongNet Figure 5: dilated vs dense attention runtime, 8K to 1B tokens",
        "",
        f"* device: {meta['device']}; torch {meta['torch']}, cuDNN {meta['cudnn']}; {meta['date']}",
        f"* `{meta['command']}`",
        f"* {meta['dtype']}, batch 1, {meta['heads']} heads, D = {meta['head_dim']}, causal, fwd+bwd time; "
        f"dilated patterns w = {meta['base_segment']} * 2^k, r = 2^k up to w = N; dense = one causal cuDNN "
        "SDPA call over N",
        "* (m) = measured on the device: median of up to "
        f"{meta['max_reps']} timed repetitions after a warm-up; (model) = modelled:",
        *model_statement(meta, result),
        *[f"* measurement stopped: {note}" for note in measured["notes"]],
        "",
        "| N | GPUs | dense s | " + " | ".join(f"dilated {n} s" for n in names) + " | rank bytes sent |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for p in result["points"]:
        sent = f"{p['rank_bytes_sent']:,.0f}" if "rank_bytes_sent" in p else "-"
        cells = " | ".join(_fmt_s(p[n]) for n in names)
        lines.append(f"| {_tokens(p['n'])} | {p['gpus']} | {_fmt_s(p[DENSE])} | {cells} | {sent} |")
    return "\n".join(lines) + "\n"


def plot(meta: dict[str, Any], result: dict[str, Any], path: str | Path) -> None:
    """Log-log runtime against N: measured points as markers, modelled ones as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in [DENSE, *result["calibration"]]:
        pts = [(p["n"], p[name]["s"], p[name]["source"]) for p in result["points"]]
        label = "dense (cuDNN)" if name == DENSE else f"dilated ({name})"
        measured = [(n, s) for n, s, src in pts if src == MEASURED]
        line = (
            ax.plot(*zip(*measured), marker="o", linestyle="-", label=f"{label}, measured")
            if measured
            else None
        )
        color = line[0].get_color() if line else None
        # Dashed from the last measured point on, through every modelled one.
        tail = [(n, s) for n, s, src in pts if src == MODELLED or (measured and n == measured[-1][0])]
        if len(tail) > 1:
            ax.plot(*zip(*tail), linestyle="--", color=color, label=f"{label}, modelled")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("fwd+bwd time (s)")
    ax.set_title(
        f"{meta['device']}, {meta['dtype']}, {meta['heads']} heads x D={meta['head_dim']}; "
        f"CP past {_tokens(result['tokens_per_gpu'])} tokens/GPU, {meta['link_gb_s']:g} GB/s (assumed)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_outputs(out: str, meta: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """Model, then OUT.json, OUT.md and OUT.png (each through a temporary name)."""
    result = model(measured, meta)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f"{out}.json", json.dumps({"meta": meta, "measured": measured, "model": result}, indent=1))
    write_atomic(f"{out}.md", render_markdown(meta, measured, result))
    plot(meta, result, f"{out}.png")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backends", type=lambda s: s.split(","), help="dilated backends (default: sdpa, and fa4 if it runs)"
    )
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--base-segment", type=int, default=2048, help="the first pattern's w (r = 1)")
    p.add_argument("--min-n", type=int, default=8192)
    p.add_argument("--max-n", type=int, default=MAX_N, help="longest N to try measuring (OOM stops earlier)")
    p.add_argument("--model-to", type=int, default=MAX_N, help="longest N of the figure")
    p.add_argument("--dense-limit-s", type=float, default=60.0, help="longest dense fwd+bwd to measure")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall time for all measurements")
    p.add_argument("--target-s", type=float, default=1.0, help="seconds of timed repetitions per point")
    p.add_argument("--max-reps", type=int, default=5)
    p.add_argument(
        "--tokens-per-gpu", type=int, help="CP chunk for the model (default: longest N all measured)"
    )
    p.add_argument("--link-gb-s", type=float, default=400.0, help="ASSUMED per-GPU link bandwidth for CP")
    p.add_argument("--out", default="benchmarks/figure5", help="writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--model-only", action="store_true", help="no GPU: model and render --from a saved run")
    p.add_argument("--from", dest="source", help="OUT.json of an earlier run (with --model-only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model_only:
        if not args.source:
            raise SystemExit("--model-only needs --from OUT.json (an earlier run's measurements)")
        try:
            saved = json.loads(Path(args.source).read_text())
            meta, measured = saved["meta"], saved["measured"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"--from {args.source}: cannot read a figure5 run ({err})") from None
        meta.update(model_to=args.model_to, link_gb_s=args.link_gb_s)
        if args.tokens_per_gpu:
            meta["tokens_per_gpu"] = args.tokens_per_gpu
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "figure5 measures on a CUDA device; use --model-only --from OUT.json without one"
            )
        args.backends = args.backends or default_backends()
        meta = {
            **_versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/figure5.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            **{
                k: getattr(args, k)
                for k in ("dtype", "heads", "head_dim", "base_segment", "min_n", "max_reps")
            },
            **{k: getattr(args, k) for k in ("model_to", "link_gb_s", "tokens_per_gpu", "budget_s")},
        }
        print(f"{meta['device']}: backends {args.backends}, budget {args.budget_s:g} s", flush=True)
        measured = measure(args)
    try:
        write_outputs(args.out, meta, measured)
    except ValueError as err:  # keep the measurements: --model-only --from can render them later
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(f"{args.out}.json", json.dumps({"meta": meta, "measured": measured}, indent=1))
        raise SystemExit(f"figure5: {err} (measurements kept in {args.out}.json)") from None
    print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png", flush=True)


if __name__ == "__main__":
    main()
