"""Benchmark training steps: LongNet (dilated attention) against dense Megatron-Core GPT, by context length.

Per (model, preset, context): tokens/s per GPU, useful model TFLOP/s, MFU and peak memory of a real
training step on one GPU, one sequence per step, bf16: forward + backward through Megatron's schedule,
Megatron's DDP (fp32 gradient buffers) and its distributed optimizer (Adam, ``get_megatron_optimizer``),
all built by ``longnet_megatron.train.Trainer`` from a JobConfig, on synthetic random tokens.

* ``longnet``: Transformer Engine layers (``get_longnet_layer_spec(use_te=True)``), dilated attention
  backend ``--backend``, patterns w_k = 2048 * 2^k, r_k = 2^k up to the context (LongNet's scaling setup).
* ``dense``: Megatron-Core's own TE layer spec (``get_gpt_layer_with_transformer_engine_spec``), causal
  TE DotProductAttention pinned to cuDNN fused attention (``attention_backend=fused``), same dims.
* ``--doc-lens 4096,65536``: LongNet rows again with document masking (``data.document_masking``) on
  synthetic documents of that mean length (``data.synthetic_document_length``); 0 is the unmasked row.
  Dense rows stay unmasked.

Every configuration runs in a FRESH SUBPROCESS (an OOM cannot poison the next one, and TE's cuDNN and
PyTorch's cuDNN SDPA stay in separate processes). Recompute ``auto``: the trainer's memory planner
(``model.recompute=auto``: the cheapest of none, selective, block recompute of k layers and full whose
modelled footprint fits the GPU); on OOM again with full recompute (uniform, 1 layer per group); the
table says which ran, the planner's modelled peak beside the measured one, and "OOM" when both failed.
``--fp8 RECIPE`` runs the TE linears of both models in FP8 (``model.fp8``; attention stays bf16). The
output layer + loss run in chunks whenever the logits would pass 1 GiB (``model.loss_chunk_tokens``
null, the training default), which at a 100K vocabulary is every context here.

FLOPs are useful model FLOPs (recomputation not counted, longnet_megatron.train.metrics): LongNet counts
the query-key pairs its patterns score, dense the causal N(N+1)/2 per head.

    python tools/bench_train.py                                 # 125m and 1.3b, 8K .. 1M, both models
    python tools/bench_train.py --presets 125m --contexts 8K,32K,128K --append
    python tools/bench_train.py --kinds dense --contexts 512K,1M --steps 1 --warmup 1 --append
    python tools/bench_train.py --presets 1.3b --contexts 128K --fp8 delayed --append
    python tools/bench_train.py --kinds longnet --presets 125m --contexts 128K --doc-lens 0,4096,65536
    # CPU smoke run (local layers, fp32, no TE), not a measurement:
    python tools/bench_train.py --device cpu --presets tiny --contexts 256 --base-segment 64 \\
        --precision fp32 --warmup 1 --steps 1 --out /tmp/bench_train_smoke

Results are written after every configuration to ``--out``.json and ``--out``.md (``--append`` merges
into an existing table, one row per model, preset and context).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_TRAIN_RESULT "
KINDS = ("longnet", "dense")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


@dataclass
class Row:
    """One measured (model, preset, context)."""

    kind: str
    preset: str
    context: int
    status: str = "ok"  # ok, OOM, timeout, error: ...
    fp8: str | None = None  # model.fp8 recipe; None: bf16 GEMMs
    recompute: str | None = None
    modelled_gib: float | None = None  # the memory planner's modelled peak for the recompute that ran
    loss_chunk_tokens: int | None = None
    attention: str | None = None
    step_ms: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    params: int | None = None
    timed_steps: int | None = None
    loss: float | None = None  # last step's loss (about ln V on random tokens: a sanity check)
    doc_len: int | None = None  # document masking on documents of this mean length (None: unmasked)


def parse_contexts(text: str) -> list[int]:
    """``"8K,32K,1M"`` -> ``[8192, 32768, 1048576]`` (K = 1024, M = 1024^2)."""
    scale = {"K": 1024, "M": 1024**2}
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        out.append(int(item[:-1]) * scale[item[-1]] if item[-1] in scale else int(item))
    return out


def short(n: int) -> str:
    """1048576 -> 1M, 32768 -> 32K, 300 -> 300."""
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="longnet,dense", help="comma list of: longnet, dense")
    p.add_argument("--presets", default="125m,1.3b", help="comma list of longnet_megatron.model presets")
    p.add_argument("--contexts", default="8K,32K,128K,512K,1M", help="comma list; K = 1024, M = 1024^2")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument(
        "--time-budget-s", type=float, default=300.0, help="stop timing after this much (>= 1 timed step)"
    )
    p.add_argument("--timeout-s", type=float, default=1200.0, help="a configuration's subprocess is killed")
    p.add_argument(
        "--recompute",
        choices=["auto", "none", "selective", "full"],
        default="auto",
        help="auto: the memory planner's choice, on OOM full",
    )
    p.add_argument(
        "--fp8", choices=FP8_RECIPES, default=None, help="FP8 recipe of the TE linears (both models)"
    )
    p.add_argument(
        "--loss-chunk-tokens", type=int, default=None, help="default: the training default; 0: plain loss"
    )
    p.add_argument("--backend", default="auto", help="dilated attention backend: auto, fa4, sdpa, te, triton")
    p.add_argument(
        "--doc-lens",
        default="0",
        help="LongNet rows with document masking on synthetic documents of these mean lengths (0: unmasked)",
    )
    p.add_argument("--base-segment", type=int, default=2048, help="LongNet w_0; w_k = w_0 * 2^k, r_k = 2^k")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak for MFU (H100 dense bf16)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="benchmarks/train", help="writes OUT.json and OUT.md")
    p.add_argument("--append", action="store_true", help="merge into an existing OUT.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration (JSON)
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",")]
    for kind in args.kinds:
        if kind not in KINDS:
            p.error(f"--kinds: unknown model {kind!r}; choose from {', '.join(KINDS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.presets = [s.strip() for s in args.presets.split(",")]
    args.contexts = parse_contexts(args.contexts)
    args.doc_lens = parse_contexts(args.doc_lens)
    if any(n < 0 for n in args.doc_lens):
        p.error("--doc-lens must be >= 0")
    return args


# ---------------------------------------------------------------------- one configuration (subprocess)


def is_oom(text: str) -> bool:
    text = text.lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text or "alloc_failed" in text


def job_config(spec: dict[str, Any]):
    """The training JobConfig of one configuration: synthetic tokens, one sequence per step, no saves."""
    from longnet_megatron.attention import DilatedAttentionConfig
    from longnet_megatron.train.config import load_config

    n = spec["context"]
    patterns = DilatedAttentionConfig.geometric(min(spec["base_segment"], n), num_patterns=64, max_segment=n)
    overrides = [
        f"model.preset={spec['preset']}",
        f"model.seq_length={n}",
        f"model.segment_lengths={list(patterns.segment_lengths)}",
        f"model.dilation_rates={list(patterns.dilation_rates)}",
        f"model.attention_backend={spec['backend']}",
        f"model.use_te={'true' if spec['device'] == 'cuda' else 'false'}",
        f"model.recompute={spec['recompute']}",
        f"model.fp8={spec.get('fp8') or 'null'}",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
        "data.synthetic=true",
        f"train.steps={spec['warmup'] + spec['steps']}",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        f"train.precision={spec['precision']}",
        "train.eval_interval=0",
        "train.exit_signal_handling=false",
        "optim.warmup_steps=0",
        "checkpoint.resume=false",
        "checkpoint.save_at_end=false",
        "checkpoint.interval=0",
        "logging.tensorboard=false",
        f"run.dir={spec['run_dir']}",
    ]
    if spec["loss_chunk_tokens"] is not None:
        overrides.append(f"model.loss_chunk_tokens={spec['loss_chunk_tokens']}")
    if spec.get("doc_len"):
        overrides += ["data.document_masking=true", f"data.synthetic_document_length={spec['doc_len']}"]
    return load_config(None, overrides)


def model_choice(kind: str, use_te: bool) -> tuple[Any, dict[str, Any], str]:
    """(layer spec or None for LongNet's, TransformerConfig overrides, attention label) of a model kind."""
    if kind == "longnet":
        return None, {}, "dilated"
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.enums import AttnBackend

    if use_te:
        # Megatron sets TE's NVTE_* switches from attention_backend: cuDNN fused attention only.
        return (
            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(),
            {"attention_backend": AttnBackend.fused},
            "TE cuDNN",
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="LayerNorm"), {}, "Megatron local"


def dilated_backend_name(requested: str, heads: int, head_dim: int, device) -> str:
    """The dilated attention backend ``requested`` resolves to (``auto`` picks by device and dtype)."""
    import torch

    from longnet_megatron.attention import get_backend

    try:
        probe = torch.empty(1, 16, heads, head_dim, dtype=torch.bfloat16, device=device)
        return getattr(get_backend(requested, probe), "name", requested)
    except Exception:  # noqa: BLE001 - only a label
        return requested


def environment(device) -> dict[str, Any]:
    import importlib.metadata as md

    import megatron.core
    import torch

    def version(package: str) -> str | None:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    env = {
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "transformer_engine": version("transformer_engine") or version("transformer-engine"),
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        try:
            cudnn = torch.backends.cudnn.version()
        except RuntimeError as err:  # TE's cuDNN loaded first: PyTorch refuses its own version check
            cudnn = f"unavailable to torch ({str(err).splitlines()[0][:60]})"
        env.update(device=torch.cuda.get_device_name(), cudnn=cudnn)
    else:
        env.update(device="CPU")
    return env


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the Trainer of ``spec``, run warm-up and timed training steps, return a Row's fields."""
    import torch

    from longnet_megatron.train.distributed import shutdown_distributed, world_from_env
    from longnet_megatron.train.job import resolve_job
    from longnet_megatron.train.metrics import memory_gib, preset_training_flops
    from longnet_megatron.train.trainer import Trainer

    resolved = resolve_job(job_config(spec), world_from_env().world_size)
    layer_spec, config_overrides, attention = model_choice(spec["kind"], spec["device"] == "cuda")
    trainer = Trainer(resolved, layer_spec=layer_spec, config_overrides=config_overrides)
    try:
        device = trainer.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        preset, n = resolved.preset, spec["context"]
        heads = preset.num_attention_heads
        patterns = None  # the preset's dilated patterns
        if spec["kind"] == "longnet":
            backend = dilated_backend_name(spec["backend"], heads, preset.hidden_size // heads, device)
            attention = f"dilated {backend}, {len(preset.dilated_attention.patterns)} patterns"
        else:
            patterns = [(n, 1)]  # one full causal segment: N(N+1)/2 pairs per head
        flops = preset_training_flops(preset, vocab_size=preset.padded_vocab_size(1), patterns=patterns)
        times, loss = [], None
        started = None
        for step in range(spec["warmup"] + spec["steps"]):
            sync()
            t0 = time.perf_counter()
            loss = trainer.train_step()["loss"]
            sync()
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
                started = started or t0
                if time.perf_counter() - started > spec["time_budget_s"]:
                    break
        step_s = statistics.median(times)
        tflops = flops / step_s / 1e12
        return {
            "status": "ok",
            "attention": attention,
            "loss_chunk_tokens": trainer.model_config.loss_chunk_tokens,
            "recompute": str(trainer.memory_plan.recompute),
            "modelled_gib": (
                trainer.memory_plan.footprint.total / 2**30 if trainer.memory_plan.footprint else None
            ),
            "step_ms": 1000 * step_s,
            "tokens_per_s": n / step_s,
            "tflops": tflops,
            "mfu": tflops / spec["peak_tflops"] if device.type == "cuda" else None,
            "peak_gib": memory_gib(),
            "params": sum(p.numel() for chunk in trainer.chunks for p in chunk.parameters()),
            "timed_steps": len(times),
            "loss": loss,
            "env": environment(device),
        }
    finally:
        trainer.close()
        shutdown_distributed()


def worker_main(spec_json: str) -> None:
    """Subprocess entry: measure one configuration and print its result as one tagged JSON line."""
    spec = json.loads(spec_json)
    spec["run_dir"] = tempfile.mkdtemp(prefix="bench_train_")
    try:
        result = measure(spec)
    except BaseException as err:  # noqa: BLE001 - reported to the parent as the row's status
        traceback.print_exc()
        text = f"{type(err).__name__}: {err}"
        status = "OOM" if is_oom(text) else f"error: {text.splitlines()[0][:200]}"
        result = {"status": status}
    shutil.rmtree(spec["run_dir"], ignore_errors=True)
    print(RESULT_TAG + json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown (CUDA / NCCL / TE atexit hooks can hang after an OOM)


# ---------------------------------------------------------------------- orchestration (parent process)


def run_subprocess(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One configuration in a fresh Python process; its result, or a status saying why there is none."""
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:  # what it logged so far says how far it got
        partial = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        sys.stderr.write(partial[-4000:])
        return {"status": f"timeout ({timeout_s:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            if result["status"] != "ok":  # an OOM's log says where the memory went
                sys.stderr.write(proc.stderr[-4000:])
            return result
    sys.stderr.write(proc.stderr[-4000:])
    if is_oom(proc.stderr):
        return {"status": "OOM"}
    return {"status": f"crashed (exit {proc.returncode})"}


def run_configuration(
    kind: str,
    preset: str,
    context: int,
    args: argparse.Namespace,
    runner: Callable[[dict[str, Any], float], dict[str, Any]] = run_subprocess,
    doc_len: int = 0,
) -> tuple[Row, dict[str, Any] | None]:
    """Measure one (kind, preset, context[, documents]), retrying with full recompute after an OOM under
    ``auto`` (the planner's choice first)."""
    spec = {
        "doc_len": doc_len,
        "kind": kind,
        "preset": preset,
        "context": context,
        "warmup": args.warmup,
        "steps": args.steps,
        "time_budget_s": args.time_budget_s,
        "loss_chunk_tokens": args.loss_chunk_tokens,
        "backend": args.backend,
        "base_segment": args.base_segment,
        "precision": args.precision,
        "peak_tflops": args.peak_tflops,
        "device": args.device,
        "fp8": args.fp8,
    }
    attempts = ["auto", "full"] if args.recompute == "auto" else [args.recompute]
    for recompute in attempts:
        result = runner({**spec, "recompute": recompute}, args.timeout_s)
        if result["status"] != "OOM":
            break
    env = result.pop("env", None)
    known = {f.name for f in fields(Row)}
    row = Row(kind=kind, preset=preset, context=context, **{k: v for k, v in result.items() if k in known})
    row.fp8 = args.fp8
    row.doc_len = doc_len or None
    if row.recompute is None:  # no measurement: say what was asked for
        row.recompute = recompute
    return row, env


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results table with what was measured and how."""
    dense = {(r.preset, r.context, r.fp8): r for r in rows if r.kind == "dense" and r.step_ms}
    unmasked = {
        (r.preset, r.context, r.fp8): r for r in rows if r.kind == "longnet" and not r.doc_len and r.step_ms
    }
    on_gpu = meta["device_kind"] == "cuda"
    layers = "Transformer Engine" if on_gpu else "Megatron local (CPU smoke run)"
    dense_attention = (
        "TE DotProductAttention on cuDNN fused attention" if on_gpu else "Megatron's local attention"
    )
    lines = [
        f"# Training throughput: LongNet vs dense ({meta.get('device', '?')}, {meta['precision']})",
        "",
        f"One sequence per step, {meta['precision']}, on synthetic tokens: forward + backward + optimizer step "
        "(Megatron DDP, distributed optimizer, Adam; longnet_megatron.train.Trainer). Step: median of the "
        f"timed steps after {meta['warmup']} warm-up steps. TFLOP/s: useful model FLOPs per GPU (LongNet: "
        "the pairs its patterns score; dense: causal N(N+1)/2; recomputation not counted); MFU against "
        f"{meta['peak_tflops']:g} TFLOP/s. Layers: {layers}. LongNet: dilated attention backend "
        f"{meta['backend']}, patterns w_k = {meta['base_segment']} * 2^k, r_k = 2^k up to N. Dense: "
        f"Megatron-Core's own layer spec, {dense_attention}, causal. Recompute: the memory planner's choice "
        "(model.recompute=auto), full on OOM; 'modelled GiB': the planner's modelled peak of that setting. "
        "FP8: the recipe of the TE linears ('-': bf16; attention, embedding and loss stay bf16). "
        "Loss chunks: tokens per chunk of the output layer + loss ('-': plain). 'dense / LongNet': dense "
        "step time over LongNet's at the same FP8 setting. Documents: mean length of the synthetic "
        "documents with document masking on ('-': unmasked; FLOPs still count the unmasked pairs); "
        "'masked / unmasked': the unmasked LongNet step time over this one.",
        "",
        "| model | preset | context | documents | FP8 | recompute | loss chunks | attention | step ms | "
        "tokens/s/GPU | TFLOP/s | MFU | peak GiB | modelled GiB | dense / LongNet | masked / unmasked | status |",
        "|---|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = dense.get((r.preset, r.context, r.fp8))
        ratio = ref.step_ms / r.step_ms if (r.kind == "longnet" and ref and r.step_ms) else None
        plain = unmasked.get((r.preset, r.context, r.fp8))
        masked = plain.step_ms / r.step_ms if (r.doc_len and plain and r.step_ms) else None
        mfu = None if r.mfu is None else 100 * r.mfu
        lines.append(
            f"| {r.kind} | {r.preset} | {short(r.context)} | {short(r.doc_len) if r.doc_len else '-'} | "
            f"{r.fp8 or '-'} | {r.recompute or '-'} | {fmt(r.loss_chunk_tokens, 'd')} | {r.attention or '-'} | "
            f"{fmt(r.step_ms, ',.0f')} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(r.tflops, '.1f')} | "
            f"{fmt(mfu, '.1f')}{'%' if mfu else ''} | {fmt(r.peak_gib, '.1f')} | {fmt(r.modelled_gib, '.1f')} | "
            f"{fmt(ratio, '.1f')}{'x' if ratio else ''} | {fmt(masked, '.2f')}{'x' if masked else ''} | {r.status} |"
        )
    versions = ", ".join(
        f"{k} {meta[k]}" for k in ("torch", "transformer_engine", "megatron_core") if meta.get(k)
    )
    lines += ["", "Commands:", "", *[f"    {c}" for c in meta["commands"]], ""]
    lines += [f"Run {meta['date']} on {meta.get('device', '?')} ({versions}).", ""]
    return "\n".join(lines)


def save(rows: list[Row], meta: dict[str, Any], out: str, append: bool) -> tuple[list[Row], dict[str, Any]]:
    """Merge with earlier rows and commands when appending; write OUT.json and OUT.md; return the table's
    rows in order and its metadata."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[tuple, Row] = {}
    meta = dict(meta)
    if append and path.with_suffix(".json").exists():
        earlier = json.loads(path.with_suffix(".json").read_text())
        for data in earlier["rows"]:
            row = Row(**data)
            merged[(row.kind, row.preset, row.context, row.fp8, row.doc_len)] = row
        meta["commands"] = [
            c for c in earlier["meta"].get("commands", []) if c not in meta["commands"]
        ] + meta["commands"]
    for row in rows:
        merged[(row.kind, row.preset, row.context, row.fp8, row.doc_len)] = row
    order = {kind: i for i, kind in enumerate(KINDS)}
    ordered = sorted(
        merged.values(), key=lambda r: (r.preset, r.context, r.fp8 or "", order[r.kind], r.doc_len or 0)
    )
    payload = {"meta": meta, "rows": [asdict(r) for r in ordered]}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(ordered, meta))
    return ordered, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
    command = shlex.join(["python", "tools/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
    meta: dict[str, Any] = {
        "commands": [command],
        "date": datetime.date.today().isoformat(),
        "device_kind": args.device,
        "precision": args.precision,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "base_segment": args.base_segment,
        "backend": args.backend,
    }
    rows: list[Row] = []
    for preset in args.presets:
        for context in args.contexts:
            for kind, doc_len in [
                (k, d) for k in args.kinds for d in (args.doc_lens if k == "longnet" else [0])
            ]:
                started = time.perf_counter()
                row, env = run_configuration(kind, preset, context, args, doc_len=doc_len)
                meta.update(env or {})
                rows.append(row)
                table, table_meta = save(rows, meta, args.out, args.append)
                docs = f" docs {short(doc_len)}" if doc_len else ""
                print(
                    f"{kind:>8} {preset:>5} {short(context):>5}{docs}: {row.status} | recompute {row.recompute} | "
                    f"{fmt(row.step_ms, ',.0f')} ms/step | {fmt(row.tokens_per_s, ',.0f')} tok/s | "
                    f"{fmt(row.tflops, '.1f')} TFLOP/s | {fmt(row.peak_gib, '.1f')} GiB "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    print()
    print(markdown(table, table_meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
