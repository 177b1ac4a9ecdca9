"""Launching the fused Triton kernels: input checks, pattern constants, tuned block sizes, autograd.

Block sizes are tuned per shape on first use (``triton.testing.do_bench`` over a few Hopper-friendly
candidates) and remembered in memory and in a JSON file (``LONGNET_TRITON_TUNE_CACHE``, default
``~/.cache/longnet_megatron/triton_tune.json``), so a training run tunes once per shape and a later
run not at all. ``LONGNET_TRITON_AUTOTUNE=0`` takes the first candidate without timing.
(Not ``triton.autotune``: its configs are fixed dicts, while each pattern's sub-tile size, a
constexpr, follows from the tile size being tuned and the pattern set of the call.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton

from ..backends.base import UnsupportedInputError
from ..backends.triton_kernel import TritonBackend, merged_delta
from ..config import DilatedAttentionConfig
from . import kernels

MAX_PATTERNS = 8

# (tile, inner block, warps, stages); the first is the default when tuning is off.
_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (64, 32, 4, 2), (128, 32, 8, 3)],
    "dq": [(64, 32, 4, 3), (64, 64, 4, 2)],
    "dkdv": [(64, 64, 4, 2), (64, 32, 4, 2)],
}
_INTERPRETER_BLOCKS = (32, 16, 4, 1)
_TUNED: dict[str, tuple[int, int, int, int]] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(q: torch.Tensor, config: DilatedAttentionConfig) -> None:
    """Raise :class:`UnsupportedInputError` naming why the fused kernel cannot run these inputs."""
    TritonBackend().check(q)  # device, dtype and head size: the same limits as the per-call kernels
    if len(config.patterns) > MAX_PATTERNS:
        raise UnsupportedInputError(
            f"the fused triton kernel takes at most {MAX_PATTERNS} patterns, got {len(config.patterns)}"
        )


def _sub_rows(tile: int, rate: int) -> int:
    """Rows of a pattern's sub-tile: the tile's selected rows, at least 16 (the smallest dot)."""
    return tile if rate == 1 else max(16, triton.next_power_of_2(triton.cdiv(tile, rate)))


def _pattern_args(config: DilatedAttentionConfig, tile: int) -> dict[str, int]:
    args: dict[str, int] = {"NPAT": len(config.patterns)}
    for i in range(MAX_PATTERNS):
        w, r = config.patterns[i] if i < len(config.patterns) else (1, 1)
        args.update({f"W{i}": w, f"R{i}": r, f"S{i}": _sub_rows(tile, r)})
    return args


def _cache_path() -> Path:
    default = Path.home() / ".cache" / "longnet_megatron" / "triton_tune.json"
    return Path(os.environ.get("LONGNET_TRITON_TUNE_CACHE", default))


def _load_tuned() -> None:
    if _TUNED or not _cache_path().exists():
        return
    try:
        _TUNED.update({k: tuple(v) for k, v in json.loads(_cache_path().read_text()).items()})
    except (OSError, ValueError):
        pass  # a damaged cache only costs a re-tune


def _save_tuned() -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_TUNED, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # read-only home: tuning still holds for this process


def _blocks(kind: str, key: str, launch) -> tuple[int, int, int, int]:
    """The tuned (tile, block, warps, stages) of ``kind`` for ``key``; ``launch(blocks)`` runs once."""
    if _interpreting():
        return _INTERPRETER_BLOCKS
    _load_tuned()
    full_key = f"{kind}|{torch.cuda.get_device_name()}|{key}"
    if full_key in _TUNED:
        return _TUNED[full_key]
    candidates = _CANDIDATES[kind]
    if os.environ.get("LONGNET_TRITON_AUTOTUNE", "1") == "0":
        return candidates[0]
    timings, errors = [], []
    for blocks in candidates:
        try:
            timings.append((triton.testing.do_bench(lambda b=blocks: launch(b), warmup=5, rep=20), blocks))
        except Exception as err:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
            errors.append(f"{blocks}: {type(err).__name__}: {str(err).splitlines()[-1][:300]}")
    if not timings:
        raise RuntimeError(f"no block configuration of the fused {kind} kernel ran for {key}: {errors}")
    _TUNED[full_key] = min(timings)[1]
    _save_tuned()
    return _TUNED[full_key]


def _shape_key(q: torch.Tensor, k: torch.Tensor, config: DilatedAttentionConfig, doc: bool) -> str:
    n = q.shape[1]
    return (
        f"n{triton.next_power_of_2(n)}|b{q.shape[0]}|h{q.shape[2]}|g{q.shape[2] // k.shape[2]}|d{q.shape[3]}"
        f"|{str(q.dtype).removeprefix('torch.')}|{config.patterns}|causal{int(config.causal)}|doc{int(doc)}"
    )


def _strides4(x: torch.Tensor) -> tuple[int, int, int]:
    if x.stride(3) != 1:
        raise ValueError("the fused triton kernel needs unit stride in head_dim")
    return x.stride(0), x.stride(1), x.stride(2)


def _doc_args(doc: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor):
    if doc is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, 0, 0
    start, end = doc
    return start, end, start.stride(0), start.stride(1)


def fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: DilatedAttentionConfig,
    *,
    scale: float,
    head_offset: int = 0,
    position_offset: int = 0,
    doc: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``[B, N, Hq, D]`` and natural-log lse ``[B, N, Hq]`` float32 of all patterns."""
    b, n, h, d = q.shape
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    ds, de, sdb, sdl = _doc_args(doc, q)

    def launch(blocks: tuple[int, int, int, int]) -> None:
        tile, block, warps, stages = blocks
        kernels._fwd_kernel[(triton.cdiv(n, tile), b * h)](
            q, k, v, out, lse, ds, de,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out),
            lse.stride(0), lse.stride(1), lse.stride(2), sdb, sdl,
            n, h, h // k.shape[2], head_offset, position_offset, scale * kernels.LOG2E,
            **_pattern_args(config, tile), CAUSAL=config.causal, DOC=doc is not None,
            BM=tile, BN=block, HEAD_DIM=d, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    launch(_blocks("fwd", _shape_key(q, k, config, doc is not None), launch))
    return out, lse


def fused_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    config: DilatedAttentionConfig,
    *,
    scale: float,
    head_offset: int = 0,
    position_offset: int = 0,
    doc: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (dq, dk, dv) given the merged output and lse ``[B, N, Hq]`` (docs/design.md section 2)."""
    b, n, h, d = q.shape
    hk = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    dout = dout if dout.stride(3) == 1 else dout.contiguous()
    delta = merged_delta(out, dout)
    ds, de, sdb, sdl = _doc_args(doc, q)
    key = _shape_key(q, k, config, doc is not None)
    common = (
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dout),
        lse.stride(0), lse.stride(1), lse.stride(2),
        delta.stride(0), delta.stride(2), delta.stride(1),
    )  # fmt: skip
    flags = {"CAUSAL": config.causal, "DOC": doc is not None, "HEAD_DIM": d}

    def launch_dq(blocks: tuple[int, int, int, int]) -> None:
        tile, block, warps, stages = blocks
        kernels._dq_kernel[(triton.cdiv(n, tile), b * h)](
            q, k, v, dout, lse, delta, dq, ds, de, *common, *_strides4(dq), sdb, sdl,
            n, h, h // hk, head_offset, position_offset, scale * kernels.LOG2E, scale,
            **_pattern_args(config, tile), **flags, BM=tile, BN=block, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def launch_dkdv(blocks: tuple[int, int, int, int]) -> None:
        tile, block, warps, stages = blocks
        kernels._dkdv_kernel[(triton.cdiv(n, tile), b * hk)](
            q, k, v, dout, lse, delta, dk, dv, ds, de, *common, *_strides4(dk), *_strides4(dv), sdb, sdl,
            n, hk, h // hk, head_offset, position_offset, scale * kernels.LOG2E, scale,
            **_pattern_args(config, tile), **flags, BN=tile, BMQ=block, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    launch_dq(_blocks("dq", key, launch_dq))
    launch_dkdv(_blocks("dkdv", key, launch_dkdv))
    return dq, dk, dv


def document_bounds(
    document_ids: torch.Tensor, position_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``[start, end)`` of each token's document, ``[B, N]`` int32 each.

    A document is a maximal run of equal ids (packed sequences: ids that change at each document
    boundary, e.g. from :func:`document_ids_from_eod`).
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
    b, n = document_ids.shape
    pos = torch.arange(n, device=document_ids.device).expand(b, n)
    change = document_ids[:, 1:] != document_ids[:, :-1]
    edge = torch.ones(b, 1, dtype=torch.bool, device=document_ids.device)
    starts = torch.where(torch.cat([edge, change], 1), pos, torch.zeros_like(pos)).cummax(1).values
    is_end = torch.cat([change, edge], 1)
    ends = torch.where(is_end, pos + 1, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    return (starts + position_offset).to(torch.int32), (ends + position_offset).to(torch.int32)


def document_ids_from_eod(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Document ids ``[B, N]`` of packed token ids: each end-of-document token closes its document."""
    is_eod = (tokens == eod_token).to(torch.int32)
    return torch.cumsum(is_eod, dim=-1) - is_eod


class FusedDilatedAttention(torch.autograd.Function):
    """One autograd node running the fused forward and backward kernels; saves q, k, v, O, L."""

    @staticmethod
    def forward(ctx, q, k, v, config, scale, head_offset, position_offset, doc_start, doc_end):  # noqa: D102
        doc = None if doc_start is None else (doc_start, doc_end)
        offsets = {"head_offset": head_offset, "position_offset": position_offset}
        out, lse = fused_forward(q, k, v, config, scale=scale, doc=doc, **offsets)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config, ctx.scale, ctx.offsets, ctx.doc = config, scale, offsets, doc
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fused_backward(
            dout, q, k, v, out, lse, ctx.config, scale=ctx.scale, doc=ctx.doc, **ctx.offsets
        )
        return dq, dk, dv, None, None, None, None, None, None
