"""Benchmark incremental decoding of the exported LongNet model: the bounded dilated KV cache against
re-running the whole sequence per token, and its size against a dense model's KV cache.

Per (preset, context N): the exported plain PyTorch model (``longnet_megatron.export.plain``) with
RANDOM weights in the preset's GPT-3 shape, patterns w_k = base * 2^k, r_k = 2^k up to N (LongNet's
scaling setup) in every layer, batch 1, on random tokens:

* prefill: the first P = N - decode steps - 2 tokens into a fresh cache, ``--prefill-chunk`` tokens
  per call (``generate.prefill``): time and peak memory (weights included);
* cached decoding: the last tokens up to N one per call, ``--decode-steps`` timed calls after two
  warm-up calls: tokens/s, and the cache's bytes and keys read per step (``LongNetCache.stats``).
  N is a multiple of every w, so these are the last positions of every pattern's segment: the most
  keys a step reads (the worst case);
* uncached: the full forward over P + j tokens for the j-th new token (what generation did before the
  cache), at most ``--uncached-steps`` calls and no more once ``--uncached-budget-s`` is spent (at 1M
  one call is a whole 1M-token forward: only a few are measured). Its last logits are compared with
  the cached call's at the same position (max |difference|);
* dense KV cache: 2 * layers * N * kv heads * head_dim * bytes, what a dense model of the same shape
  would hold (computed).

    python tools/bench_decode.py --device cuda --dtype bf16 --backend sdpa          # 125m, 1.3b at 8K, 128K, 1M
    # CPU smoke run (a CI test), not a measurement:
    python tools/bench_decode.py --device cpu --dtype fp32 --presets tiny --contexts 256,512 \\
        --base-segment 32 --decode-steps 4 --uncached-steps 2 --prefill-chunk 100 --out /tmp/bench_decode

Writes ``--out``.json and ``--out``.md (``--append`` merges into an existing table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longnet_megatron.attention import DilatedAttentionConfig  # noqa: E402
from longnet_megatron.export.generate import prefill  # noqa: E402
from longnet_megatron.export.plain import LongNetArgs, LongNetForCausalLM  # noqa: E402
from longnet_megatron.model.presets import get_preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import parse_contexts, short  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GiB = 1 << 30


@dataclass
class Row:
    """One measured (preset, context)."""

    preset: str
    context: int
    patterns: int
    prefill_s: float | None = None
    prefill_peak_gib: float | None = None
    decode_ms: float | None = None  # median per token
    decode_tokens_per_s: float | None = None
    uncached_ms: float | None = None  # median per token
    uncached_tokens_per_s: float | None = None
    uncached_steps: int = 0
    speedup: float | None = None
    cache_bytes: int | None = None
    dense_kv_bytes: int | None = None
    keys_per_step: float | None = None  # (query head, key) pairs per decoded token, all layers
    key_bound: int | None = None  # per layer and query head
    max_logit_diff: float | None = None  # cached vs uncached, same position
    status: str = "ok"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="125m,1.3b", help="comma list of longnet_megatron.model presets")
    p.add_argument("--contexts", default="8K,128K,1M", help="comma list; K = 1024, M = 1024^2")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--backend", default="auto", help="dilated attention backend of the prefill and uncached path"
    )
    p.add_argument("--base-segment", type=int, default=2048, help="w_0; w_k = w_0 * 2^k, r_k = 2^k up to N")
    p.add_argument("--prefill-chunk", type=int, default=65536, help="prompt tokens per prefill call")
    p.add_argument("--decode-steps", type=int, default=32, help="timed cached decoding calls")
    p.add_argument("--uncached-steps", type=int, default=4, help="at most this many uncached calls")
    p.add_argument(
        "--uncached-budget-s", type=float, default=20.0, help="no further uncached call after this"
    )
    p.add_argument("--out", default="benchmarks/decode", help="writes OUT.json and OUT.md")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT.json")
    args = p.parse_args(argv)
    if args.decode_steps < 1 or args.uncached_steps < 0 or args.prefill_chunk < 1:
        p.error("--decode-steps and --prefill-chunk must be >= 1, --uncached-steps >= 0")
    args.presets = [s.strip() for s in args.presets.split(",")]
    args.contexts = parse_contexts(args.contexts)
    return args


def model_args(preset_name: str, context: int, args: argparse.Namespace) -> LongNetArgs:
    """The exported model of a preset's shape, with LongNet's scaling patterns up to ``context``."""
    preset = get_preset(preset_name)
    patterns = DilatedAttentionConfig.geometric(
        args.base_segment, 64, max_segment=max(context, args.base_segment)
    )
    heads = preset.num_attention_heads
    return LongNetArgs(
        vocab_size=preset.padded_vocab_size(),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size or 4 * preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=preset.num_query_groups or heads,
        head_dim=preset.hidden_size // heads,
        dilated_attention=[patterns.to_dict()] * preset.num_layers,
        max_position_embeddings=context,
        rope_theta=float(preset.rotary_base),
        attention_backend=args.backend,
    )


def random_model(margs: LongNetArgs, device: torch.device, dtype: torch.dtype) -> LongNetForCausalLM:
    """Random weights, built on the device: matrices normal(0, 0.02) as Megatron initialises them,
    norms and biases as PyTorch does."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LongNetForCausalLM(margs)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None


@torch.no_grad()
def measure(preset: str, context: int, args: argparse.Namespace) -> Row:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    margs = model_args(preset, context, args)
    row = Row(preset, context, len(margs.layer_patterns(0).patterns))
    model = random_model(margs, device, dtype)
    start_decode = context - args.decode_steps - 2
    if start_decode < 1:
        raise ValueError(f"context {context} is too short for {args.decode_steps} decoding steps")
    tokens = torch.randint(0, margs.vocab_size, (1, context), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    cache = model.new_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    cached_logits = [prefill(model, tokens[:, :start_decode], cache, args.prefill_chunk)]
    sync(device)
    row.prefill_s, row.prefill_peak_gib = time.perf_counter() - start, peak_gib(device)
    times, keys = [], []
    for step in range(args.decode_steps + 2):
        position = start_decode + step
        sync(device)
        start = time.perf_counter()
        logits = model(tokens[:, position : position + 1], cache)[:, -1]
        sync(device)
        if step >= 2:  # two warm-up calls
            times.append(time.perf_counter() - start)
            keys.append(cache.stats().attended_keys)
        cached_logits.append(logits)
    stats = cache.stats()
    row.decode_ms = 1e3 * statistics.median(times)
    row.decode_tokens_per_s = 1e3 / row.decode_ms
    row.cache_bytes, row.key_bound = stats.bytes, stats.key_bound
    row.keys_per_step = statistics.mean(keys)
    item = torch.empty((), dtype=dtype).element_size()
    row.dense_kv_bytes = (
        2 * margs.num_hidden_layers * context * margs.num_key_value_heads * margs.head_dim * item
    )
    del cache
    uncached, diffs, spent = [], [], 0.0
    for step in range(args.uncached_steps):
        if spent > args.uncached_budget_s:
            break
        sync(device)
        start = time.perf_counter()
        logits = model(tokens[:, : start_decode + step], logits_to_keep=1)[:, -1]
        sync(device)
        uncached.append(time.perf_counter() - start)
        spent += uncached[-1]
        diffs.append(float((logits.float() - cached_logits[step].float()).abs().max()))
    if uncached:
        row.uncached_steps = len(uncached)
        row.uncached_ms = 1e3 * statistics.median(uncached)
        row.uncached_tokens_per_s = 1e3 / row.uncached_ms
        row.speedup = row.uncached_ms / row.decode_ms
        row.max_logit_diff = max(diffs)
    return row


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    env["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return env


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results table with what was measured and how."""
    lines = [
        f"# Incremental decoding: bounded dilated KV cache vs re-running the sequence "
        f"({meta.get('device', '?')}, {meta['dtype']})",
        "",
        "The exported plain PyTorch model with RANDOM weights in each preset's shape, batch 1, patterns "
        f"w_k = {meta['base_segment']} * 2^k, r_k = 2^k up to the context in every layer, attention backend "
        f"{meta['backend']} for the prefill and the uncached forward. Prefill: the context but the last "
        f"{meta['decode_steps'] + 2} tokens into a fresh cache, {meta['prefill_chunk']} tokens per call (peak: "
        "all CUDA memory allocated, weights included). Decode: median of one-token calls for the last "
        "positions (the ends of every pattern's segment: the most keys a step reads). Uncached: median "
        "of full forwards over the sequence so far for the next token, what generation did before the "
        "cache (few calls at long contexts; 'calls' says how many). Keys/step: (query head, key) pairs one new token scores, "
        "all layers; bound: keys per layer and query head at most. Dense KV: a dense model's K and V for "
        "the context. Logit diff: max |cached - uncached| logits at the same positions.",
        "",
        "| preset | context | patterns | prefill s | prefill peak GiB | decode ms/token | decode tokens/s | "
        "uncached ms/token | calls | speedup | cache MiB | dense KV MiB | keys/step | bound/head | "
        "logit diff | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.preset} | {short(r.context)} | {r.patterns} | {fmt(r.prefill_s, '.2f')} | "
            f"{fmt(r.prefill_peak_gib, '.1f')} | {fmt(r.decode_ms, '.2f')} | {fmt(r.decode_tokens_per_s, ',.1f')} | "
            f"{fmt(r.uncached_ms, ',.1f')} | {r.uncached_steps} | {fmt(r.speedup, ',.1f')}{'x' if r.speedup else ''} | "
            f"{mib(r.cache_bytes)} | {mib(r.dense_kv_bytes)} | {fmt(r.keys_per_step, ',.0f')} | "
            f"{fmt(r.key_bound, ',d')} | {fmt(r.max_logit_diff, '.2g')} | {r.status} |"
        )
    lines += ["", "Commands:", "", *[f"    {c}" for c in meta["commands"]], ""]
    lines += [f"Run {meta['date']} on {meta.get('device', '?')} (torch {meta.get('torch', '?')}).", ""]
    return "\n".join(lines)


def save(rows: list[Row], meta: dict[str, Any], out: str, append: bool) -> list[Row]:
    """Write OUT.json and OUT.md (merged with earlier rows when appending); the table's rows in order."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[tuple[str, int], Row] = {}
    if append and path.with_suffix(".json").exists():
        earlier = json.loads(path.with_suffix(".json").read_text())
        merged = {(r["preset"], r["context"]): Row(**r) for r in earlier["rows"]}
        meta["commands"] = [c for c in earlier["meta"]["commands"] if c not in meta["commands"]] + meta[
            "commands"
        ]
    merged.update({(r.preset, r.context): r for r in rows})
    ordered = [merged[key] for key in sorted(merged)]
    payload = {"meta": meta, "rows": [asdict(r) for r in ordered]}
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", markdown(ordered, meta))):
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path.with_suffix(suffix))
    return ordered


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_decode: --device cuda but no CUDA GPU is available (use --device cpu)", file=sys.stderr)
        return 2
    command = shlex.join(["python", "tools/bench_decode.py", *(sys.argv[1:] if argv is None else argv)])
    meta: dict[str, Any] = {
        "commands": [command],
        "date": datetime.date.today().isoformat(),
        "dtype": args.dtype,
        "backend": args.backend,
        "base_segment": args.base_segment,
        "prefill_chunk": args.prefill_chunk,
        "decode_steps": args.decode_steps,
        **environment(device),
    }
    rows: list[Row] = []
    for preset in args.presets:
        for context in args.contexts:
            started = time.perf_counter()
            try:
                row = measure(preset, context, args)
            except torch.OutOfMemoryError:
                row = Row(preset, context, 0, status="OOM")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            table = save(rows, meta, args.out, args.append)
            print(
                f"{preset:>5} {short(context):>5}: prefill {fmt(row.prefill_s, '.2f')} s, "
                f"decode {fmt(row.decode_tokens_per_s, ',.1f')} tokens/s, uncached "
                f"{fmt(row.uncached_tokens_per_s, ',.2f')} tokens/s ({row.uncached_steps} calls), cache "
                f"{mib(row.cache_bytes)} MiB vs dense {mib(row.dense_kv_bytes)} MiB "
                f"({time.perf_counter() - started:.0f} s) {row.status}",
                flush=True,
            )
    print()
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
