"""Results as files: JSON (everything), markdown tables, PNG plots; one or several models at once.

``write_result(result, "out/perplexity")`` writes ``out/perplexity.json``, ``.md`` and ``.png``, each
through a temporary name and a rename, so a killed evaluation leaves no half-written file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch

from longnet_megatron.checkpoint.files import write_atomic
from longnet_megatron.eval import plots
from longnet_megatron.eval.errors import EvalError
from longnet_megatron.train.position_loss import bucket_label


def run_info(command: str) -> dict[str, Any]:
    """The command, date and software versions of this evaluation."""
    import megatron.core

    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
    }


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_result(result: dict[str, Any], out: str | Path) -> list[Path]:
    """``out.json``, ``out.md`` and ``out.png`` of one evaluation result; the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")]
    write_json(paths[0], result)
    write_atomic(paths[1], markdown([("model", result)]))
    plot = plots.plot_perplexity if result["kind"] == "perplexity" else plots.plot_passkey
    plot([("model", result)], paths[2])
    return paths


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def model_line(result: dict[str, Any]) -> str:
    m = result["model"]
    layout = m["layout"]
    step = f", step {m['step']}" if m.get("step") is not None else ""
    return (
        f"`{m['path']}` ({m['kind']}{step}, {m.get('parameters', 0) / 1e6:.1f}M parameters, trained at "
        f"L={m['trained_length']:,}); patterns ({m['patterns_source']}) {m['patterns']}; attention "
        f"{m['attention_backend']}, {m['dtype']} on {m['device']}, tp={layout['tp']} pp={layout['pp']} "
        f"cp={layout['cp']}"
    )


def markdown(named: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown tables of one or several results (perplexity and passkey ones, in any mix)."""
    lines: list[str] = []
    for name, result in named:
        lines.append(f"* **{name}**: {model_line(result)}")
    lines.append("")
    perplexity = [(n, r) for n, r in named if r["kind"] == "perplexity"]
    passkey = [(n, r) for n, r in named if r["kind"] == "passkey"]
    if perplexity:
        lines += _perplexity_tables(perplexity)
    for name, result in passkey:
        lines += _passkey_tables(name, result)
    return "\n".join(lines).rstrip() + "\n"


def _perplexity_tables(named: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["## Loss by evaluation context", ""]
    for name, r in named:
        d = r["data"]
        lines.append(
            f"{name}: `{d['prefix']}` ({d['split']}), {d['sequences']} sequences of L={d['seq_length']:,}."
        )
    lines += [
        "",
        "| model | context | loss | perplexity | tokens | tokens/s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in named:
        for row in r["contexts"]:
            lines.append(
                f"| {name} | {_size(row['context'])} | {row['loss']:.4f} | {row['ppl']:.2f} | "
                f"{row['tokens']:,} | {row['tokens_per_s']:,.0f} | {row['peak_memory_gib']:.1f} |"
            )
    lines += ["", "## Loss by token position (each model at each context)", ""]
    columns = [(name, row) for name, r in named for row in r["contexts"]]
    edges = max((r["edges"] for _, r in named), key=len)
    lines.append("| positions | " + " | ".join(f"{n} @ {_size(row['context'])}" for n, row in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        cells = [_fmt(row["by_position"][i]) if i < len(row["by_position"]) else "-" for _, row in columns]
        lines.append(f"| {bucket_label(low, high)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _passkey_tables(name: str, r: dict[str, Any]) -> list[str]:
    depths = r["depths"]
    head = "| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | mean |"
    rule = "|---|" + "---:|" * (len(depths) + 1)
    lines = [
        f"## Passkey retrieval: {name}",
        "",
        f"{r['trials']} random {len(r['rows'][0]['key'])}-digit keys per cell (seed {r['seed']}); greedy "
        f"exact-match accuracy, then the key's mean log-probability (a uniform guess: "
        f"{r['chance_logprob']:.2f} for the digits). {r['seconds']:.1f} s, peak {r['peak_memory_gib']:.1f} GiB.",
        "",
        head,
        rule,
    ]
    for n, row in zip(r["lengths"], r["accuracy"]):
        lines.append(
            f"| {_size(n)} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {sum(row) / len(row):.2f} |"
        )
    lines += ["", head, rule]
    for n, row in zip(r["lengths"], r["key_logprob"]):
        lines.append(
            f"| {_size(n)} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {sum(row) / len(row):.2f} |"
        )
    return lines + [""]


def load_results(named_paths: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, result)`` of each ``(name, path)``; a file that is not a result is an :class:`EvalError`."""
    named = []
    for name, path in named_paths:
        try:
            result = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: not a JSON result of longnet-eval ({e})") from None
        if not isinstance(result, dict) or result.get("kind") not in ("perplexity", "passkey"):
            raise EvalError(f"{path}: not a result of longnet-eval perplexity or passkey")
        named.append((name, result))
    return named


def write_report(
    named: list[tuple[str, dict[str, Any]]], out: str | Path, title: str | None = None
) -> list[Path]:
    """``out.md`` and, for the kinds present, ``out_perplexity.png`` / ``out_passkey.png``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(named)
    if title:
        text = f"# {title}\n\n{text}"
    paths = [out.with_suffix(".md")]
    write_atomic(paths[0], text)
    for kind, plot in (("perplexity", plots.plot_perplexity), ("passkey", plots.plot_passkey)):
        chosen = [(n, r) for n, r in named if r["kind"] == kind]
        if chosen:
            path = out.with_name(f"{out.name}_{kind}.png")
            plot(chosen, path)
            paths.append(path)
    return paths
