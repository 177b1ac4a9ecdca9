"""FP8 loss parity on a GPU: the same model trained in bf16 and with each FP8 recipe, same init, same data.

Every run is a real ``python -m longnet_megatron.train`` in its own process, with the same seed (so the
same initial weights: they are created in bf16, FP8 only changes how the TE linears compute) and the
same packed dataset read in the same order; only ``model.fp8`` differs. The dataset is this machine's
Python standard library tokenized with cl100k (``longnet-prep``), unless ``--data`` names a packed prefix.
Written: ``--out``.json (every logged step of every run) and ``--out``.md (the table: loss at a few steps,
the mean |FP8 - bf16| loss difference over the last ``--window`` steps, tokens/s).

    python tools/bench_fp8.py                                     # 125m, L=4096, 300 steps, 3 recipes
    python tools/bench_fp8.py --recipes delayed --steps 200 --out /tmp/fp8
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("delayed", "tensorwise", "blockwise")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of FP8 recipes")
    p.add_argument(
        "--backend", default="auto", help="dilated attention backend of every run (model.attention_backend)"
    )
    p.add_argument("--window", type=int, default=50, help="last steps the loss difference is averaged over")
    p.add_argument("--data", default=None, help="a packed prefix at --seq-length (default: pack the stdlib)")
    p.add_argument("--workers", type=int, default=8, help="tokenizer processes for the default dataset")
    p.add_argument("--out", default="benchmarks/train_fp8", help="writes OUT.json and OUT.md")
    p.add_argument(
        "--workdir", default=None, help="keep the dataset and each run's train.log here (default: a temp dir)"
    )
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for recipe in args.recipes:
        if recipe not in RECIPES:
            p.error(f"--recipes: unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    return args


def stdlib_dataset(root: Path, seq_length: int, workers: int) -> str:
    """This machine's Python standard library, tokenized with cl100k and packed at ``seq_length``."""
    from data_prep.pack import pack_datasets
    from data_prep.tokenize_corpus import tokenize_corpus

    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
        if not {"site-packages", "dist-packages"} & set(Path(f).relative_to(stdlib).parts)
    )
    tokenize_corpus(
        files, str(root / "stdlib"), workers=workers, on_error="skip", progress=False, log=lambda m: None
    )  # the standard library's own test files include deliberately undecodable ones
    pack_datasets(
        [str(root / "stdlib")], str(root / "packed"), seq_length=seq_length, split="98,2,0", progress=False
    )
    return str(root / "packed")


def train_command(args: argparse.Namespace, data: str, run_dir: Path, fp8: str | None) -> list[str]:
    """``longnet-train`` with only overrides (no CONFIG file): the run of one recipe."""
    overrides = [
        f"model.preset={args.preset}",
        f"model.seq_length={args.seq_length}",
        f"model.fp8={fp8 or 'null'}",
        f"model.attention_backend={args.backend}",
        f"data.prefixes=[{data}]",
        f"train.steps={args.steps}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={args.global_batch}",
        "train.precision=bf16",
        "train.eval_interval=0",
        f"optim.lr={args.lr}",
        f"optim.min_lr={args.lr / 10}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
        "logging.interval=10",
        "logging.tensorboard=false",
        f"run.dir={run_dir}",
    ]
    return [sys.executable, "-m", "longnet_megatron.train", *overrides]


def train(args: argparse.Namespace, data: str, run_dir: Path, fp8: str | None) -> list[dict[str, Any]]:
    """One training run; its logged train records (every 10 steps and the first)."""
    command = train_command(args, data, run_dir, fp8)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    print(f"{fp8 or 'bf16':>10}: started ({log})", flush=True)
    with open(log, "w") as out:  # streamed, so a run cut off by a time limit leaves its log
        result = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"bench_fp8: the {fp8 or 'bf16'} run failed (exit {result.returncode}; log {log})")
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    print(f"{fp8 or 'bf16':>10}: {time.perf_counter() - started:.0f} s", flush=True)
    return [r for r in rows if r["kind"] == "train"]


def compare(reference: list[dict[str, Any]], other: list[dict[str, Any]], window: int) -> dict[str, float]:
    """Loss differences of ``other`` against ``reference`` at the steps both logged."""
    ref = {r["step"]: r for r in reference}
    pairs = [(ref[r["step"]]["loss"], r["loss"]) for r in other if r["step"] in ref]
    last_step = max(ref)
    tail = pairs[-max(1, window // 10) :]  # logged every 10 steps
    return {
        "max_abs_diff": max(abs(b - a) for a, b in pairs),
        "tail_mean_abs_diff": sum(abs(b - a) for a, b in tail) / len(tail),
        "tail_mean_rel_diff": sum(abs(b - a) / a for a, b in tail) / len(tail),
        "final_loss": other[-1]["loss"],
        "final_loss_bf16": ref[last_step]["loss"],
    }


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "megatron_core": version("megatron-core") or version("megatron_core"),
        "transformer_engine": version("transformer_engine") or version("transformer-engine"),
    }


def markdown(payload: dict[str, Any]) -> str:
    meta, runs = payload["meta"], payload["runs"]
    steps = sorted({1, 10, 50, 100, 200, meta["steps"]} & {r["step"] for r in runs["bf16"]})
    lines = [
        f"# FP8 loss parity ({meta['device']}, {meta['preset']}, L={meta['seq_length']})",
        "",
        f"{meta['preset']} trained {meta['steps']} steps of {meta['global_batch']} x {meta['seq_length']} tokens "
        f"on {meta['data']}, dilated attention backend {meta.get('backend', 'auto')}, bf16 and with the FP8 recipes of the TE linears (model.fp8; dilated attention, "
        "embedding and loss in bf16), same seed (same initial weights), same data order. 'tail |diff|': mean "
        f"|FP8 - bf16| loss over the last {meta['window']} steps (logged every 10).",
        "",
        "| run | "
        + " | ".join(f"loss @ {s}" for s in steps)
        + " | tail abs diff | tail rel diff | tokens/s |",
        "|---|" + "---:|" * (len(steps) + 3),
    ]
    for name, rows in runs.items():
        by_step = {r["step"]: r for r in rows}
        c = payload["comparison"].get(name)
        tokens = sum(r["tokens_per_s"] for r in rows[-5:]) / len(rows[-5:])
        lines.append(
            f"| {name} | "
            + " | ".join(f"{by_step[s]['loss']:.4f}" for s in steps)
            + (
                f" | {c['tail_mean_abs_diff']:.4f} | {100 * c['tail_mean_rel_diff']:.2f}% |"
                if c
                else " | - | - |"
            )
            + f" {tokens:,.0f} |"
        )
    versions = ", ".join(
        f"{k} {meta[k]}" for k in ("torch", "transformer_engine", "megatron_core") if meta.get(k)
    )
    lines += [
        "",
        "Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Run {meta['date']} on {meta['device']} ({versions}).",
        "",
    ]
    return "\n".join(lines)


def write_results(args: argparse.Namespace, command: str, runs: dict[str, list[dict[str, Any]]]) -> str:
    """OUT.json and OUT.md of the runs so far (after each run: a cut-off benchmark keeps what finished)."""
    payload = {
        "meta": {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "preset": args.preset,
            "seq_length": args.seq_length,
            "global_batch": args.global_batch,
            "steps": args.steps,
            "window": args.window,
            "backend": args.backend,
            "data": args.data or "the Python standard library (cl100k)",
            **environment(),
        },
        "runs": runs,
        "comparison": {
            name: compare(runs["bf16"], rows, args.window) for name, rows in runs.items() if name != "bf16"
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", markdown(payload))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    return markdown(payload)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "tools/bench_fp8.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="bench_fp8_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = args.data or stdlib_dataset(root, args.seq_length, args.workers)
        print(f"dataset {data}: {time.perf_counter() - started:.0f} s", flush=True)
        runs = {"bf16": train(args, data, root / "bf16", None)}
        table = write_results(args, command, runs)
        for recipe in args.recipes:
            runs[f"fp8 {recipe}"] = train(args, data, root / recipe, recipe)
            table = write_results(args, command, runs)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
