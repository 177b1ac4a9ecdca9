"""Training metrics: model FLOPs, and the console / TensorBoard / JSON-lines writers.

FLOPs are *useful* model FLOPs (the MFU convention: activation recomputation is not counted):
3 x forward (backward = 2 x forward), with, per token and layer, the matmuls of the QKV projection
``2 h (Hq + 2 Hkv) d``, the output projection ``2 Hq d h`` and the MLP ``4 h f``; the logits
``2 h V``; and the attention ``4 d`` per (query, key) pair a head actually scores. Under dilated
attention that pair count is what the patterns select, not N^2/2 (see :func:`attention_pairs`).
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import torch

from longnet_megatron.checkpoint.files import write_atomic
from longnet_megatron.model.presets import LongNetPreset

# Dense bf16 tensor-core peaks (TFLOP/s per GPU) used when logging.peak_tflops is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def attention_pairs(seq_length: int, num_heads: int, patterns, causal: bool = True) -> int:
    """(query, key) pairs scored by all heads over one sequence, summed over the dilated patterns.

    Pattern (w, r) on head h selects positions with (p mod w) mod r == h mod r; within each segment
    (the last possibly partial) the c selected positions form c(c+1)/2 causal pairs (c^2 otherwise).
    """
    total = 0
    for w, r in patterns:
        full, tail = divmod(seq_length, w)
        for h in range(num_heads):
            o = h % r
            for length, count in ((w, full), (tail, 1 if tail else 0)):
                c = length // r + (1 if o < length % r else 0)
                total += count * (c * (c + 1) // 2 if causal else c * c)
    return total


def training_flops_per_sequence(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    kv_heads: int,
    ffn_hidden_size: int,
    vocab_size: int,
    seq_length: int,
    patterns,
    causal: bool = True,
) -> float:
    """Useful training FLOPs (forward + backward) of one sequence of ``seq_length`` tokens."""
    d = hidden_size // num_heads
    per_token_layer = 2 * hidden_size * (num_heads + 2 * kv_heads) * d + 2 * num_heads * d * hidden_size
    per_token_layer += 4 * hidden_size * ffn_hidden_size
    attention = 4 * d * attention_pairs(seq_length, num_heads, patterns, causal)
    forward = (
        num_layers * (per_token_layer * seq_length + attention) + 2 * hidden_size * vocab_size * seq_length
    )
    return 3.0 * forward


def preset_training_flops(preset: LongNetPreset, *, vocab_size: int, patterns=None) -> float:
    """:func:`training_flops_per_sequence` of a preset at its length (``vocab_size``: the padded one).

    ``patterns`` replaces the preset's dilated ones (e.g. ``[(L, 1)]``: dense causal attention).
    """
    return training_flops_per_sequence(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_heads=preset.num_attention_heads,
        kv_heads=preset.num_query_groups or preset.num_attention_heads,
        ffn_hidden_size=preset.ffn_hidden_size or 4 * preset.hidden_size,
        vocab_size=vocab_size,
        seq_length=preset.seq_length,
        patterns=preset.dilated_attention.patterns if patterns is None else patterns,
    )


def peak_tflops(configured: float | None) -> float | None:
    """The per-GPU peak for MFU: the configured one, or a known GPU's bf16 peak (None on CPU)."""
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_metrics(path: str, step: int) -> None:
    """Keep only the records of ``path`` up to ``step`` (and no half-written last line).

    A run resumed from the checkpoint of step ``step`` repeats the steps after it; without this the
    records between that checkpoint and the kill would appear twice. Rewritten atomically.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the line a killed run was writing
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record.get("step", 0) <= step:
                kept.append(line)
    write_atomic(path, "".join(kept))


class MetricsWriter:
    """One console line per interval, TensorBoard scalars and ``metrics.jsonl`` (rank 0 only).

    ``resume_step``: the step the run starts from; records after it (left by the run that was
    interrupted) are dropped first, so every step appears once.
    """

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        truncate_metrics(path, resume_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            else:
                # purge_step: drop the events a resumed run writes again (as truncate_metrics does).
                purge = resume_step + 1 if resume_step else None
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "kind") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        if console:
            print(format_record(record), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_record(r: dict[str, Any]) -> str:
    """The console line of a record."""
    if r.get("kind") == "valid":
        return f"step {r['step']:>6} | validation loss {r['loss']:.4f} | perplexity {r['ppl']:.2f}"
    if r.get("kind") == "eval":
        b = r["buckets"]
        shown = [f"{low}+ {loss:.3f}" for low, loss in zip(b["edges"][:-1], b["loss"]) if loss is not None]
        return f"step {r['step']:>6} | eval loss {r['loss']:.4f} | by position: {', '.join(shown)}"
    parts = [
        f"step {r['step']:>6}/{r['steps']}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.3e}",
        f"grad norm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['memory_gib']:.2f} GiB")
    parts.append(f"{r['step_time_s'] * 1000:.0f} ms/step")
    return " | ".join(parts)
