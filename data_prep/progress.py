"""A progress bar for long jobs: input MB/s and ETA (from input bytes), documents/s and tokens/s."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """tqdm over input bytes, with document and token rates in the postfix."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_bytes,
            desc=desc,
            unit="B",
            unit_scale=True,
            disable=not enabled,
            file=sys.stderr,
            mininterval=0.5,
            smoothing=0.1,
        )
        self._start = time.perf_counter()
        self.docs = 0
        self.tokens = 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(
            f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed / 1e6:.2f}M tok/s", refresh=False
        )
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()
