"""The dilated attention configuration: which (segment length, dilation rate) patterns, causal, scale.

Validation follows docs/design.md section 1 and runs when the object is made, so a bad configuration fails
before any work with an error that names the offending value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# LongNet's language-model configuration (arXiv 2307.02486, section 4.1).
PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class DilatedAttentionConfig:
    """Patterns (w_i, r_i) of dilated attention, plus causality and the softmax scale.

    segment_lengths: w_i, strictly increasing positive integers.
    dilation_rates:  r_i, positive integers with r_i <= w_i; at least one r_i == 1 so every query is
                     covered. w_i need not be a multiple of r_i (ragged dilated segments are exact).
    causal:          a query attends only keys at positions <= its own.
    softmax_scale:   None means 1 / sqrt(head_dim).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool = True
    softmax_scale: float | None = field(default=None)

    def __post_init__(self) -> None:
        # Accept lists (from YAML / JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "segment_lengths", tuple(self.segment_lengths))
        object.__setattr__(self, "dilation_rates", tuple(self.dilation_rates))
        w, r = self.segment_lengths, self.dilation_rates
        if not w:
            raise ValueError("segment_lengths is empty: dilated attention needs at least one pattern")
        if len(w) != len(r):
            raise ValueError(
                f"segment_lengths has {len(w)} entries but dilation_rates has {len(r)}: one rate per segment"
            )
        for i, value in enumerate(w):
            if not _is_positive_int(value):
                raise ValueError(f"segment_lengths[{i}]={value!r} must be a positive integer")
        for i, value in enumerate(r):
            if not _is_positive_int(value):
                raise ValueError(f"dilation_rates[{i}]={value!r} must be a positive integer")
        for i in range(len(w)):
            if r[i] > w[i]:
                raise ValueError(
                    f"dilation_rates[{i}]={r[i]} is larger than segment_lengths[{i}]={w[i]}: "
                    "a segment must hold at least one selected position"
                )
        for i in range(1, len(w)):
            if w[i] <= w[i - 1]:
                raise ValueError(
                    f"segment_lengths[{i}]={w[i]} is not larger than segment_lengths[{i - 1}]={w[i - 1]}: "
                    "segment lengths must be strictly increasing"
                )
        if 1 not in r:
            raise ValueError(f"dilation_rates={r} has no rate 1: at least one pattern must cover every query")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be a bool")
        s = self.softmax_scale
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s)
        ):
            raise ValueError(f"softmax_scale={s!r} must be a positive finite number or None")

    @property
    def patterns(self) -> tuple[tuple[int, int], ...]:
        """The (segment length, dilation rate) pairs in order."""
        return tuple(zip(self.segment_lengths, self.dilation_rates))

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale used for heads of size ``head_dim``."""
        return float(self.softmax_scale) if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    @classmethod
    def geometric(
        cls,
        base_segment: int = 2048,
        num_patterns: int = 5,
        ratio: int = 2,
        *,
        max_segment: int | None = None,
        causal: bool = True,
        softmax_scale: float | None = None,
    ) -> DilatedAttentionConfig:
        """LongNet's geometric sequence: w_k = base * ratio^k, r_k = ratio^k, k = 0 .. num_patterns-1.

        With ``max_segment`` the sequence stops at the last w_k <= max_segment (the paper's scaling
        experiment grows the set with the sequence length this way).
        """
        if not _is_positive_int(base_segment):
            raise ValueError(f"base_segment={base_segment!r} must be a positive integer")
        if not _is_positive_int(num_patterns):
            raise ValueError(f"num_patterns={num_patterns!r} must be a positive integer")
        if not _is_positive_int(ratio) or ratio < 2:
            raise ValueError(f"ratio={ratio!r} must be an integer >= 2")
        ws, rs = [], []
        for k in range(num_patterns):
            w = base_segment * ratio**k
            if max_segment is not None and w > max_segment:
                break
            ws.append(w)
            rs.append(ratio**k)
        if not ws:
            raise ValueError(f"max_segment={max_segment} is smaller than base_segment={base_segment}")
        return cls(tuple(ws), tuple(rs), causal=causal, softmax_scale=softmax_scale)

    @classmethod
    def paper(cls, *, causal: bool = True) -> DilatedAttentionConfig:
        """The paper's language-model patterns: w = 2048..32768, r = (1, 2, 4, 6, 12)."""
        return cls(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES, causal=causal)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for checkpoints, YAML configs and exported models."""
        return {
            "segment_lengths": list(self.segment_lengths),
            "dilation_rates": list(self.dilation_rates),
            "causal": self.causal,
            "softmax_scale": self.softmax_scale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DilatedAttentionConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {"segment_lengths", "dilation_rates", "causal", "softmax_scale"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown dilated attention keys {unknown}; expected a subset of {sorted(known)}"
            )
        missing = sorted({"segment_lengths", "dilation_rates"} - set(data))
        if missing:
            raise ValueError(f"dilated attention config is missing {missing}")
        return cls(**data)
