"""PNG plots of evaluation results with matplotlib (headless Agg backend).

* :func:`plot_perplexity`: loss against token position (log scale; one line per context for one
  model, each model's full context for several) beside loss against evaluation context.
* :func:`plot_passkey`: one heat map of greedy accuracy per model, length by depth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

Named = list[tuple[str, dict[str, Any]]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """Write through a temporary name and a rename (no half-written PNG)."""
    plt = _pyplot()
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _bucket_x(edges: list[int]) -> list[float]:
    """Geometric middle of each bucket [low, high) (the first, [0, 1), at 0.5)."""
    return [max(low, 0.5) * (high / max(low, 0.5)) ** 0.5 for low, high in zip(edges[:-1], edges[1:])]


def plot_perplexity(named: Named, path: str | Path) -> None:
    plt = _pyplot()
    fig, (by_position, by_context) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in named:
        rows = r["contexts"] if len(named) == 1 else r["contexts"][-1:]
        for row in rows:
            points = [(x, y) for x, y in zip(_bucket_x(r["edges"]), row["by_position"]) if y is not None]
            label = (
                f"context {row['context']:,}" if len(named) == 1 else f"{name} (context {row['context']:,})"
            )
            by_position.plot(*zip(*points), marker=".", label=label)
        by_context.plot(
            [row["context"] for row in r["contexts"]],
            [row["loss"] for row in r["contexts"]],
            marker="o",
            label=name,
        )
    by_position.set(xscale="log", xlabel="token position (bucket middle)", ylabel="loss (nats/token)")
    by_position.set_title("Loss by position")
    by_context.set(xscale="log", xlabel="evaluation context (tokens)", ylabel="mean loss (nats/token)")
    by_context.set_title("Loss by context (same tokens)")
    for ax in (by_position, by_context):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_passkey(named: Named, path: str | Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(named), figsize=(4.2 * len(named) + 1, 4), squeeze=False)
    image = None
    for ax, (name, r) in zip(axes[0], named):
        image = ax.imshow(r["accuracy"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]])
        ax.set_yticks(range(len(r["lengths"])), [f"{n:,}" for n in r["lengths"]])
        ax.set(xlabel="depth of the key (0: farthest from the question)", ylabel="length (tokens)")
        ax.set_title(f"{name}: passkey accuracy", fontsize=10)
        for i, row in enumerate(r["accuracy"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="greedy exact match")
    _save(fig, path)
