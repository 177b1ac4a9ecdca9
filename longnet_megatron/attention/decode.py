"""Incremental dilated attention: a bounded key/value cache and exact decoding (docs/design.md,
"Incremental decoding").

Segments of one pattern (w, r) are disjoint, so a query reads, per head and pattern, only the selected
keys of its own segment: at most ceil(w / r) of them. :class:`DilatedKVCache` (one layer) keeps, per
pattern and head offset o, a *slot*: the keys and values of the pattern's current segment at the
positions offset o selects, for the query heads of offset o (GQA: the query heads of one kv group can
have different offsets, so keys are kept per query head). A slot is emptied when its segment ends: the
cache holds at most sum_i ceil(w_i / r_i) keys per query head, whatever the context.

Storage is one ``[B, Hq, R, D]`` tensor for keys and one for values, pattern i owning rows
``[start_i, start_i + ceil(w_i / r_i))``; a slot is a view of its pattern's rows and its heads.
:meth:`DilatedKVCache.attend` takes the next tokens' q, k, v and returns their attention output as
:func:`~.api.dilated_attention` over the whole sequence would (section 1), in one of three ways:

* one token (decoding): its key joins the slot of each pattern's selected offset, and each head
  attends all rows at once, masked to the slots that select the token (one fused attention call per
  layer, its index math on the device, whatever the number of patterns);
* a few tokens (speculative verification): per pattern and per piece of the new tokens within one
  segment, each offset the piece selects appends its keys to its slot, and its queries (the slot's last
  rows) attend the slot causally;
* many tokens (prefill): the tokens' own attention runs through ``dilated_attention`` (any backend,
  positions offset), the queries in a segment begun before attend that segment's cached keys, and
  then each slot keeps the tail of its pattern's last segment.

The softmax runs over the multiset union of the patterns' keys (one softmax over the masked rows, or
partial results merged by log-sum-exp with :func:`~.merge.merge_partial`): a key that two patterns
reach counts twice, as in the full computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .api import dilated_attention
from .backends import AttentionBackend
from .config import DilatedAttentionConfig
from .function import new_accumulators
from .indexing import RowBlock, Selection, heads_for_offset, kv_heads_for
from .merge import merge_partial

# Calls of 2 .. this many tokens take the piecewise decoding path; longer ones the prefill path.
DECODE_MAX_TOKENS = 16
# Storage rows are a multiple of this (aligned masks for the fused attention kernels).
_ROW_ALIGN = 8


@dataclass(frozen=True)
class CacheStats:
    """What a cache holds and what its last call computed; counts are per batch item.

    tokens: positions seen. bytes: key and value memory allocated (all batch items).
    cached_keys: (key, query head) pairs held. key_bound: the most keys any query head can read at one
    position (sum over patterns of its slots' capacity). attended_keys: (query position, query head,
    key) triples the last call scored; a key that two patterns reach counts twice. dense_bytes: what a
    dense key/value cache of ``tokens`` positions would take.
    """

    tokens: int
    bytes: int
    cached_keys: int
    key_bound: int
    attended_keys: int
    dense_bytes: int


@dataclass
class _Slot:
    """Keys and values of one (pattern, head offset) in the pattern's current segment."""

    offset: int
    query_heads: slice
    kv_heads: slice | tuple[int, ...]  # the heads of k/v each query head reads, in order
    num_heads: int
    start: int  # first storage row
    capacity: int
    keys: torch.Tensor | None = None  # [B, capacity, num_heads, D], a view of the storage
    values: torch.Tensor | None = None
    length: int = 0


def selected_before(rel: int, dilation: int, offset: int) -> int:
    """How many of a segment's first ``rel`` positions ``offset`` selects (positions o, o + r, ...)."""
    return 0 if rel <= offset else (rel - 1 - offset) // dilation + 1


def _pieces(start: int, end: int, segment_length: int) -> list[tuple[int, int]]:
    """[start, end) cut at the multiples of ``segment_length``."""
    cuts = range((start // segment_length + 1) * segment_length, end, segment_length)
    bounds = [start, *cuts, end]
    return list(zip(bounds[:-1], bounds[1:]))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[B, m, H, D]`` over k, v ``[B, L, H, D]``, with its log-sum-exp ``[B, H, m]``.

    Causal means the queries are the last m key positions (query j sees keys up to L - m + j).
    Computed in float32 (float64 for float64 inputs), as the reference backend does.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    m, length = q.shape[1], k.shape[1]
    scores = torch.einsum("bmhd,blhd->bhml", q.to(ct), k.to(ct)) * scale
    if causal and m > 1:
        mask = torch.ones(m, length, dtype=torch.bool, device=q.device).triu_(length - m + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhml,blhd->bmhd", torch.exp(scores - lse[..., None]), v.to(ct))
    return out, lse


def _pairs(before: int, after: int) -> int:
    """Query-key pairs of the queries between ``before`` and ``after`` rows of a slot (causal)."""
    m = after - before
    return m * before + m * (m + 1) // 2


class DilatedKVCache:
    """The decoding cache of one causal dilated attention layer (positions start at 0).

    config: the layer's patterns (causal). num_heads, num_kv_heads, head_dim: of q and k/v.
    head_offset: global index of local query head 0 (tensor parallelism), as in ``dilated_attention``.
    max_positions: the positions the cache may hold (a model's position limit); it also caps the
        slots of patterns longer than it. max_decode_tokens: calls of 2 up to this many tokens take
        the piecewise decoding path, longer ones the prefill path (all exact).

    Storage is allocated on the first call, for its batch size, dtype and device. With
    :meth:`activate_past_recording`, emptied slots are kept so that :meth:`crop` can undo a call
    across a segment end (transformers' protocol for speculative decoding).
    """

    def __init__(
        self,
        config: DilatedAttentionConfig,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        head_offset: int = 0,
        max_positions: int | None = None,
        max_decode_tokens: int = DECODE_MAX_TOKENS,
    ) -> None:
        if not config.causal:
            raise ValueError("incremental decoding needs causal dilated attention (config.causal is False)")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})"
            )
        if head_offset < 0 or head_offset % (num_heads // num_kv_heads):
            raise ValueError(
                f"head_offset={head_offset} must be >= 0 and a multiple of the GQA group size "
                f"{num_heads // num_kv_heads}"
            )
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions={max_positions} must be at least 1")
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.head_offset = head_offset
        self.max_positions = max_positions
        self.max_decode_tokens = max_decode_tokens
        self.scale = config.scale_for(head_dim)
        self.length = 0
        self.record_past = False
        self.batch: int | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.keys: torch.Tensor | None = None  # [B, Hq, rows, D]
        self.values: torch.Tensor | None = None
        self._segment = [0] * len(config.patterns)  # segment of each pattern's last position (or 0)
        self._starts: list[int] = []  # first storage row of each pattern
        self._pattern_rows: list[int] = []  # rows each pattern owns (its offset 0 slot's capacity)
        self._slots: list[dict[int, _Slot]] = []
        start = 0
        for w, r in config.patterns:
            limit = w if max_positions is None else min(w, max_positions)
            slots = {}
            for o in range(min(r, limit)):
                heads = heads_for_offset(num_heads, r, o, head_offset)
                if heads is None:
                    continue  # no head has this offset: its keys are never read, so never kept
                kv_heads = kv_heads_for(heads, num_heads, num_kv_heads)
                count = len(range(num_heads)[heads])
                slots[o] = _Slot(o, heads, kv_heads, count, start, selected_before(limit, r, o))
            self._starts.append(start)
            self._pattern_rows.append(selected_before(limit, r, 0))
            self._slots.append(slots)
            start += self._pattern_rows[-1]
        # One spare row takes the single-token path's writes for heads a pattern does not select.
        self.rows = -(-(start + 1) // _ROW_ALIGN) * _ROW_ALIGN
        # Emptied slots kept for crop while recording: pattern -> segment -> offset -> (keys, values).
        self._history: list[dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = [
            {} for _ in config.patterns
        ]
        self._last_call = (0, 0)
        self._step_index: dict[str, torch.Tensor] = {}
        self._position: torch.Tensor | None = None  # the device's copy of ``length``, when in step
        self._position_at = -1
        self.key_bound = max(
            sum(slots[o].capacity for (_, r), slots in zip(config.patterns, self._slots) if (o := (head_offset + h) % r) in slots)
            for h in range(num_heads)
        )  # fmt: skip

    # -- the computation ---------------------------------------------------------------------------
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | AttentionBackend = "auto"
    ) -> torch.Tensor:
        """Attention output ``[B, n, Hq, D]`` of the next n tokens (positions ``length`` ..), cached.

        q ``[B, n, Hq, D]``, k and v ``[B, n, Hkv, D]``; ``backend`` serves the prefill path.
        The cache is for inference: inputs that need gradients are refused, not silently detached.
        """
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ValueError(
                "the decode cache is for inference: no gradients flow through it; run under "
                "torch.no_grad() or without a cache (use_cache=False)"
            )
        self._check(q, k, v)
        if self.batch is None:
            self._allocate(q.shape[0], q.dtype, q.device)
        if not self.record_past:
            self._drop_history()
        n = q.shape[1]
        if n == 1 and self.max_decode_tokens >= 1:
            out = self._step(q, k, v)
        elif n <= self.max_decode_tokens:
            out = self._decode(q, k, v)
        else:
            out = self._prefill(q, k, v, backend)
        self._last_call = (self.length, self.length + n)
        self.length += n
        return out

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token: write its key into every selecting slot, then one masked attention over all rows."""
        t = self.length
        for i, (w, r) in enumerate(self.config.patterns):
            self._enter(i, t // w)  # before the write: a recorded slot is copied out first
            slot = self._slots[i].get(t % w % r)
            if slot is not None:
                slot.length += 1
        if self._position_at != t:
            self._position = torch.tensor(t, dtype=torch.long, device=self.device)
        index = self._step_index
        rel = self._position % index["w"]  # [P] position within each pattern's segment
        row = rel // index["r"]  # [P] the token's row within its slot
        selects = index["head_mod"] == (rel % index["r"])  # [Hq, P] head's offset is the token's
        target = torch.where(selects, index["start"] + row, self.rows - 1)  # else the spare row
        heads = index["heads"]
        self.keys[:, heads, target] = k[:, 0, index["kv_heads"]][:, :, None]
        self.values[:, heads, target] = v[:, 0, index["kv_heads"]][:, :, None]
        pattern = index["row_pattern"]
        visible = selects[:, pattern] & (index["row_local"] <= row[pattern])  # [Hq, rows]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.keys, self.values, attn_mask=visible[None, :, None, :], scale=self.scale
        )
        self._position += 1
        self._position_at = t + 1
        return out.transpose(1, 2)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Piece by piece: append each offset's selected keys, then its queries attend the slot."""
        t0, t1 = self.length, self.length + q.shape[1]
        out, lse = new_accumulators(q)
        for i, (w, r) in enumerate(self.config.patterns):
            for a, b in _pieces(t0, t1, w):
                base = a - a % w
                self._enter(i, a // w)
                for slot in self._touched(i, a - base, b - base, r):
                    block = self._append(slot, k, v, base, b, w, r, t0)
                    if block is None:
                        continue
                    sel = Selection(block, slot.query_heads)
                    rows = slice(0, slot.length)
                    o_i, l_i = _attend(
                        sel.gather(q), slot.keys[:, rows], slot.values[:, rows], self.scale, True
                    )
                    merge_partial(out, lse, sel, o_i, l_i)
        return out.to(q.dtype)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | AttentionBackend
    ) -> torch.Tensor:
        """The tokens' own attention by ``dilated_attention``, merged with their cached segment heads."""
        t0, t1 = self.length, self.length + q.shape[1]
        out, lse = dilated_attention(
            q, k, v, self.config, head_offset=self.head_offset, position_offset=t0, backend=backend,
            return_lse=True,
        )  # fmt: skip
        merged = False
        for i, (w, r) in enumerate(self.config.patterns):
            rel = t0 % w
            if rel == 0:
                continue  # the tokens start a segment: no earlier key of it exists
            base, end = t0 - rel, min(t1, t0 - rel + w)
            for slot in self._touched(i, rel, end - base, r):
                new = selected_before(end - base, r, slot.offset) - slot.length
                if slot.length == 0 or new == 0:
                    continue
                if not merged:
                    out, merged = out.to(lse.dtype), True
                block = RowBlock(base + slot.offset + slot.length * r - t0, 1, new, w, r)
                sel = Selection(block, slot.query_heads)
                rows = slice(0, slot.length)
                o_i, l_i = _attend(sel.gather(q), slot.keys[:, rows], slot.values[:, rows], self.scale, False)
                merge_partial(out, lse, sel, o_i, l_i)
        for i, (w, r) in enumerate(self.config.patterns):
            pieces = _pieces(t0, t1, w)
            for a, b in pieces if self.record_past else pieces[-1:]:
                base = a - a % w
                self._enter(i, a // w)
                for slot in self._touched(i, a - base, b - base, r):
                    self._append(slot, k, v, base, b, w, r, t0)
        return out.to(q.dtype)

    # -- state: transformers' cache operations ------------------------------------------------------
    def activate_past_recording(self) -> None:
        """Keep emptied slots until the next :meth:`crop`, so that a call can be undone across a segment end."""
        self.record_past = True

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise a clear error if :meth:`crop` of ``tokens_to_remove`` cannot be done (nothing changes)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass minus the number of tokens to remove, or 0")
        target = self.length + tokens_to_remove
        if target < 0:
            raise ValueError(f"crop({tokens_to_remove}): the cache holds only {self.length} tokens")
        for i, (w, r) in enumerate(self.config.patterns):
            s = (target - 1) // w if target else 0
            if target and s != self._segment[i] and s not in self._history[i]:
                raise ValueError(
                    f"cannot remove {-tokens_to_remove} tokens: position {target - 1} lies in an earlier "
                    f"segment of pattern (w={w}, r={r}) whose keys were dropped; call "
                    "activate_past_recording() before the call that may be undone"
                )

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: 0 or negative).

        Within a pattern's current segment this shortens its slots; reaching back into an earlier
        segment needs that segment's keys, kept only while recording. Every crop (``crop(0)`` too)
        then drops what recording kept.
        """
        self.check_crop(tokens_to_remove)
        target = self.length + tokens_to_remove
        for i, (w, r) in enumerate(self.config.patterns):
            s = (target - 1) // w if target else 0
            if target and s != self._segment[i]:
                for o, slot in self._slots[i].items():
                    keys, values = self._history[i][s][o]
                    slot.keys.copy_(keys)
                    slot.values.copy_(values)
            self._segment[i] = s
            for slot in self._slots[i].values():
                slot.length = selected_before(target - s * w, r, slot.offset)
        self._drop_history()
        self.length = target
        self._last_call = (target, target)

    def reset(self) -> None:
        """Empty the cache and free its storage (the next call may bring another batch, dtype or device)."""
        self.length = 0
        self.batch = self.dtype = self.device = None
        self.keys = self.values = None
        self._segment = [0] * len(self.config.patterns)
        for slots in self._slots:
            for slot in slots.values():
                slot.keys = slot.values = None
                slot.length = 0
        self._drop_history()
        self._last_call = (0, 0)
        self._step_index = {}
        self._position, self._position_at = None, -1

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder, repeat) batch items by ``index`` (beam search, finished sequences)."""
        self._map(lambda t: t[index.to(t.device)])

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch item ``repeats`` times in place (``repeat_interleave``)."""
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def stats(self) -> CacheStats:
        """Memory held, the per-head key bound, and the keys the last call attended."""
        tensors = [t for t in (self.keys, self.values) if t is not None]
        tensors += [
            t
            for history in self._history
            for kept in history.values()
            for pair in kept.values()
            for t in pair
        ]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        cached = sum(slot.length * slot.num_heads for slots in self._slots for slot in slots.values())
        item = torch.empty((), dtype=self.dtype).element_size() if self.dtype is not None else 0
        dense = 2 * (self.batch or 0) * self.length * self.num_kv_heads * self.head_dim * item
        return CacheStats(
            self.length, nbytes, cached, self.key_bound, self._attended(*self._last_call), dense
        )

    # -- slots -------------------------------------------------------------------------------------
    def _attended(self, t0: int, t1: int) -> int:
        """(query, query head, key) triples that positions [t0, t1) score, counted from positions alone."""
        total = 0
        for i, (w, r) in enumerate(self.config.patterns):
            for a, b in _pieces(t0, t1, w):
                base = a - a % w
                for slot in self._touched(i, a - base, b - base, r):
                    before = selected_before(a - base, r, slot.offset)
                    after = selected_before(b - base, r, slot.offset)
                    total += slot.num_heads * _pairs(before, after)
        return total

    def _touched(self, pattern: int, lo: int, hi: int, dilation: int) -> list[_Slot]:
        """Slots of ``pattern`` whose offset selects a position in [lo, hi) of a segment."""
        slots = self._slots[pattern]
        if hi - lo >= dilation:
            return list(slots.values())
        return [slots[o] for o in sorted({p % dilation for p in range(lo, hi)}) if o in slots]

    def _append(
        self, slot: _Slot, k: torch.Tensor, v: torch.Tensor, base: int, end: int, w: int, r: int, t0: int
    ) -> RowBlock | None:
        """Append the new tokens' keys that ``slot`` selects in [.., end) of the segment at ``base``.

        Returns the rows appended, local to the call's tokens (starting at global ``t0``), or None.
        """
        after = selected_before(end - base, r, slot.offset)
        count = after - slot.length
        if count <= 0:
            return None
        block = RowBlock(base + slot.offset + slot.length * r - t0, 1, count, w, r)
        sel = Selection(block, slot.kv_heads)
        slot.keys[:, slot.length : after] = sel.gather(k)
        slot.values[:, slot.length : after] = sel.gather(v)
        slot.length = after
        return block

    def _enter(self, pattern: int, segment: int) -> None:
        """Make ``segment`` the pattern's current one, emptying its slots (copied out while recording)."""
        if self._segment[pattern] == segment:
            return
        if self.record_past:
            self._history[pattern][self._segment[pattern]] = {
                o: (slot.keys.clone(), slot.values.clone()) for o, slot in self._slots[pattern].items()
            }
        for slot in self._slots[pattern].values():
            slot.length = 0
        self._segment[pattern] = segment

    def _allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.dtype, self.device = batch, dtype, device
        shape = (batch, self.num_heads, self.rows, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._bind_slots()
        self._step_index = self._step_tensors(device)

    def _bind_slots(self) -> None:
        """Point every slot at its rows and heads of the storage (views: writes go through)."""
        for slots in self._slots:
            for slot in slots.values():
                rows = slice(slot.start, slot.start + slot.capacity)
                slot.keys = self.keys[:, slot.query_heads, rows].transpose(1, 2)
                slot.values = self.values[:, slot.query_heads, rows].transpose(1, 2)

    def _step_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Constant index tensors of the single-token path, on the device."""
        patterns = self.config.patterns
        long = {"dtype": torch.long, "device": device}
        heads = torch.arange(self.num_heads, **long)
        group = self.num_heads // self.num_kv_heads
        row_pattern = torch.zeros(self.rows, **long)
        row_local = torch.full((self.rows,), self.rows, **long)  # padding rows: never visible
        for i, (start, count) in enumerate(zip(self._starts, self._pattern_rows)):
            row_pattern[start : start + count] = i
            row_local[start : start + count] = torch.arange(count, **long)
        rates = torch.tensor([r for _, r in patterns], **long)
        return {
            "w": torch.tensor([w for w, _ in patterns], **long),
            "r": rates,
            "start": torch.tensor(self._starts, **long),
            "head_mod": (heads[:, None] + self.head_offset) % rates[None, :],
            "heads": heads[:, None],
            "kv_heads": heads // group,
            "row_pattern": row_pattern,
            "row_local": row_local,
        }

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.batch is None:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.batch = self.keys.shape[0]
        self._bind_slots()
        for history in self._history:
            for kept in history.values():
                for o, (keys, values) in kept.items():
                    kept[o] = (fn(keys), fn(values))

    def _drop_history(self) -> None:
        for history in self._history:
            history.clear()

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"q must be [batch, tokens, heads, head_dim] and k, v alike; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        expected_q = (self.num_heads, self.head_dim)
        expected_kv = (self.num_kv_heads, self.head_dim)
        if (
            tuple(q.shape[2:]) != expected_q
            or tuple(k.shape[2:]) != expected_kv
            or q.shape[:2] != k.shape[:2]
        ):
            raise ValueError(
                f"this cache holds {self.num_heads} query heads, {self.num_kv_heads} key/value heads of "
                f"{self.head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[1] < 1:
            raise ValueError("attend needs at least one new token")
        if self.batch is not None and (q.shape[0], q.dtype, q.device) != (
            self.batch,
            self.dtype,
            self.device,
        ):
            raise ValueError(
                f"this cache holds batch {self.batch}, {self.dtype} on {self.device}; got batch "
                f"{q.shape[0]}, {q.dtype} on {q.device} (reset() it, or make a new one)"
            )
        if self.max_positions is not None and self.length + q.shape[1] > self.max_positions:
            raise ValueError(
                f"positions {self.length}..{self.length + q.shape[1] - 1} pass the position limit "
                f"{self.max_positions} (max_position_embeddings)"
            )
