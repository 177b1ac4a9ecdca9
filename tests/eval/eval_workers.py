"""Functions the evaluation tests run inside gloo ranks (module level, so spawn can pickle them).

* :func:`parallel_worker` (2 ranks): trains the tiny model 4 steps (DP=2, ``eval`` section on, a
  checkpoint at the end), evaluates that checkpoint under TP=2, PP=2 and CP=2, and saves a copy of its
  weights without tokenizer metadata;
* :func:`single_worker` (1 rank): exports the checkpoint, evaluates the export and the checkpoint at
  TP=1, then runs ``longnet-eval`` itself (outputs and one-line errors).
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from longnet_megatron.eval.loading import ModelOptions, load_scorer
from longnet_megatron.eval.passkey import evaluate_passkey
from longnet_megatron.eval.perplexity import evaluate_perplexity
from longnet_megatron.parallel.layout import ParallelLayout, initialize_megatron_parallel

SEQ = 128
SEQUENCES = 4
CONTEXTS = [32, 128]
LENGTHS = [288, 320]  # the byte tokenizer's passkey prompt takes 264 tokens without filler
DEPTHS = [0.0, 0.5, 1.0]
REPO = Path(__file__).resolve().parents[2]


def evaluate(model: str, data: dict, layout: ParallelLayout | None = None) -> dict:
    """Perplexity (contexts 32, 128) and passkey results of ``model`` under ``layout``."""
    layout = layout or ParallelLayout()
    options = ModelOptions(backend="reference", dtype="float32", tp=layout.tp, pp=layout.pp, cp=layout.cp)
    scorer = load_scorer(model, options)
    return {
        "ppl": evaluate_perplexity(
            scorer, data["packed"], sequences=SEQUENCES, contexts=CONTEXTS, progress=False
        ),
        "pk": evaluate_passkey(scorer, LENGTHS, DEPTHS, trials=1, progress=False),
        "scorer": scorer,
    }


def parallel_worker(data: dict) -> dict:
    import torch.distributed as dist

    from longnet_megatron.checkpoint.files import find_checkpoint
    from longnet_megatron.checkpoint.record import read_record
    from longnet_megatron.checkpoint.weights import save_weights
    from longnet_megatron.train.config import load_config
    from longnet_megatron.train.job import resolve_job
    from longnet_megatron.train.trainer import Trainer

    run = Path(data["root"]) / "run"
    overrides = [
        f"data.prefixes=[{data['packed']}]",
        f"run.dir={run}",
        "train.steps=4",
        "train.eval_interval=0",
        "eval.interval=2",
        f"eval.sequences={SEQUENCES}",
        "checkpoint.interval=0",
        "checkpoint.resume=false",
        "logging.interval=1000",
        "train.exit_signal_handling=false",
        "optim.warmup_steps=1",
    ]
    trainer = Trainer(resolve_job(load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides), 2))
    trainer.train()
    trainer.close()
    out = {}
    for name, layout in (
        ("tp2", ParallelLayout(tp=2)),
        ("pp2", ParallelLayout(pp=2)),
        ("cp2", ParallelLayout(cp=2)),
    ):
        initialize_megatron_parallel(layout)
        result = evaluate(str(run), data, layout)
        scorer = result.pop("scorer")
        out[name] = result
    # The same weights without tokenizer metadata (as a run on synthetic data would record them).
    record = dict(read_record(find_checkpoint(run)), tokenizer=None)
    save_weights([scorer.inner], Path(data["root"]) / "no_tokenizer", record, step=4)
    dist.barrier()
    if dist.get_rank() == 0:
        out["metrics"] = [json.loads(line) for line in open(run / "metrics.jsonl")]
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        out["tensorboard"] = sorted(events.Tags()["scalars"])
    return out


def _cli(args: list[str]) -> dict:
    from longnet_megatron.eval.cli import main

    result = CliRunner().invoke(main, args)
    return {"exit_code": result.exit_code, "output": result.output, "exception": repr(result.exception)}


def single_worker(data: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from longnet_megatron.export.megatron_to_hf import export_to_hf

    root = Path(data["root"])
    export_to_hf(root / "run", root / "hf")
    out = {"hf": evaluate(str(root / "hf"), data), "tp1": evaluate(str(root / "run"), data)}
    # The scorer against the exported model's own full logits (what the chunked path avoids).
    scorer = out["hf"].pop("scorer")
    out["tp1"].pop("scorer")
    tokens = torch.randint(0, 257, (2, 96), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    positions = [0, 50, 95]
    scores = scorer.score(tokens, labels, positions)
    with torch.no_grad():
        logits = scorer.model(tokens).float()
    out["hand"] = {
        "losses": (scores.losses, F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")),
        "logits": (scores.logits, logits[:, positions]),
    }

    # The command line: outputs, then bad input (each CLI run closes the process group it used).
    ppl = str(root / "cli" / "ppl")
    hf_ppl = str(root / "cli" / "hf_ppl")
    pk = str(root / "cli" / "pk")
    common = ["--backend", "reference", "-q"]
    cli = {
        "perplexity": _cli(
            [
                "perplexity",
                str(root / "run"),
                "--data",
                data["packed"],
                "--sequences",
                "2",
                "--contexts",
                "64,128",
                "--out",
                ppl,
                *common,
            ]
        ),
        "perplexity_hf": _cli(
            [
                "perplexity",
                str(root / "hf"),
                "--data",
                data["packed"],
                "--sequences",
                "2",
                "--contexts",
                "64,128",
                "--out",
                hf_ppl,
                *common,
            ]
        ),
        "passkey_extended": _cli(
            [
                "passkey",
                str(root / "run"),
                "--lengths",
                "288",
                "--depths",
                "0,1",
                "--trials",
                "1",
                "--segment-lengths",
                "64,128,256,512",
                "--dilation-rates",
                "1,2,4,8",
                "--out",
                pk,
                *common,
            ]
        ),
        "no_tokenizer": _cli(["perplexity", str(root / "no_tokenizer"), "--data", data["packed"], *common]),
        "other_tokenizer": _cli(["perplexity", str(root / "run"), "--data", data["cl100k"], *common]),
        "context_too_long": _cli(
            ["perplexity", str(root / "run"), "--data", data["packed"], "--contexts", "256", *common]
        ),
        "too_long_to_fit": _cli(["passkey", str(root / "run"), "--lengths", "1G", *common]),
        "too_short": _cli(["passkey", str(root / "run"), "--lengths", "100", *common]),
        "bad_patterns": _cli(
            [
                "passkey",
                str(root / "run"),
                "--lengths",
                "288",
                "--segment-lengths",
                "64,32",
                "--dilation-rates",
                "1,2",
                *common,
            ]
        ),
        "missing": _cli(["perplexity", str(root / "nothing_here"), "--data", data["packed"], *common]),
        "export_with_tp": _cli(
            ["perplexity", str(root / "hf"), "--data", data["packed"], "--tp", "2", *common]
        ),
    }
    cli["report"] = _cli(
        [
            "report",
            f"LongNet={ppl}.json",
            f"export={hf_ppl}.json",
            f"passkey={pk}.json",
            "--out",
            str(root / "cli" / "report"),
            "--title",
            "test",
        ]
    )
    cli["report_bad"] = _cli(["report", f"x={root / 'packed.pack.json'}", "--out", str(root / "cli" / "bad")])
    out["cli"] = cli
    out["files"] = sorted(p.name for p in (root / "cli").iterdir())
    out["results"] = {k: json.loads(Path(p + ".json").read_text()) for k, p in (("ppl", ppl), ("pk", pk))}
    return out
