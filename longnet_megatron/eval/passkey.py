"""Passkey retrieval: a random key hidden at a depth of filler text, asked for at the end.

The prompt (Mohtashami & Jaggi 2023, "Landmark Attention", as LongNet-style evaluations use it)::

    INTRO  FILLER ... NEEDLE(key) ... FILLER  QUESTION  ANSWER(key)

built in token space from separately tokenized pieces: length + 1 tokens, so the model reads exactly
``length`` of them (the answer's last token is only a label), and the needle starts exactly ``round(depth * filler tokens)`` filler tokens after the intro (depth 0:
right after the intro, the farthest from the question; 1: right before it). The pieces start with a
space and end at a word or a full stop, and each filler run starts at a sentence, so the
concatenation is what tokenizing the decoded text gives (tests check the round trip). The answer is scored from one forward pass: the key's log-
probability (the sum over its tokens) and greedy exact match (every answer token is the argmax given
the prompt and the key's earlier tokens: exactly what greedy decoding would produce).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from longnet_megatron.eval.errors import EvalError

if TYPE_CHECKING:  # the prompt builder stays light (tools/eval_experiment.py writes training documents)
    from longnet_megatron.eval.scoring import BaseScorer

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
KEY_DIGITS = 5
CHANCE_LOGPROB = -math.log(9 * 10 ** (KEY_DIGITS - 1))  # a uniform guess among the 5-digit keys
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BATCH_TOKENS = 1 << 20


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey sequence: ``tokens`` (prompt + answer), the key, where the needle and answer start."""

    tokens: list[int]
    key: str
    depth: float
    needle_start: int
    answer_start: int

    @property
    def answer(self) -> list[int]:
        return self.tokens[self.answer_start :]


def random_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))


def prompt_overhead(tokenizer: Any) -> int:
    """Tokens the model reads of a passkey sequence without filler (the shortest length)."""
    key = "9" * KEY_DIGITS
    texts = (INTRO, NEEDLE.format(key=key), QUESTION, ANSWER.format(key=key))
    return sum(len(tokenizer.encode(t)) for t in texts) - 1


def build_passkey(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The passkey sequence of ``length + 1`` tokens (the model reads ``length``), ``key`` at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"--depths {depth}: depths are fractions between 0 and 1")
    intro = list(tokenizer.encode(INTRO))
    needle = list(tokenizer.encode(NEEDLE.format(key=key)))
    question = list(tokenizer.encode(QUESTION))
    answer = list(tokenizer.encode(ANSWER.format(key=key)))
    fill = length + 1 - len(intro) - len(needle) - len(question) - len(answer)
    if fill < 0:
        raise EvalError(
            f"--lengths {length}: shorter than a passkey prompt without filler "
            f"({length - fill} tokens with this tokenizer)"
        )
    unit = list(tokenizer.encode(FILLER))
    filler = (unit * (fill // len(unit) + 1))[:fill]
    before = round(depth * fill)
    # Both filler runs start at a sentence: a run cut mid-sentence after the needle could begin with a
    # "." that tokenizes together with the needle's last "." once decoded.
    tokens = intro + filler[:before] + needle + filler[: fill - before] + question + answer
    return PasskeyPrompt(
        tokens=tokens,
        key=key,
        depth=depth,
        needle_start=len(intro) + before,
        answer_start=length + 1 - len(answer),
    )


def _score_group(scorer: BaseScorer, prompts: list[PasskeyPrompt]) -> list[tuple[float, bool]]:
    """(key log-probability, greedy exact match) of prompts of one length and answer position."""
    ids = torch.tensor([p.tokens for p in prompts], dtype=torch.int64)
    start, count = prompts[0].answer_start, len(prompts[0].answer)
    positions = list(range(start - 1, start - 1 + count))  # the inputs that predict the answer
    logits = scorer.score(ids[:, :-1], ids[:, 1:], positions).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = ids[:, start:]
    chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    exact = (logits.argmax(dim=-1) == targets).all(dim=-1)
    return [(float(lp), bool(ok)) for lp, ok in zip(chosen.sum(dim=-1), exact)]


def check_lengths(scorer: BaseScorer, lengths: list[int], batch_tokens: int) -> None:
    """Lengths must hold the prompt, split over the CP ranks and fit in memory (errors name --lengths)."""
    overhead = prompt_overhead(scorer.tokenizer)
    for n in lengths:
        if n < overhead:
            raise EvalError(
                f"--lengths {n}: shorter than a passkey prompt without filler ({overhead} tokens with "
                "this tokenizer)"
            )
        if n % scorer.cp_size:
            raise EvalError(
                f"--lengths {n}: not divisible by the context-parallel size --cp {scorer.cp_size}"
            )
        scorer.check_fits(max(1, batch_tokens // n) * n, f"--lengths {n}")


def evaluate_passkey(
    scorer: BaseScorer,
    lengths: list[int],
    depths: list[float] = DEFAULT_DEPTHS,
    *,
    trials: int = 5,
    seed: int = 0,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy and key log-probability by length and depth (``trials`` random keys each)."""
    if trials < 1:
        raise EvalError(f"--trials {trials} must be >= 1")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"--depths {d}: depths are fractions between 0 and 1")
    check_lengths(scorer, lengths, batch_tokens)
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=sum(lengths) * len(depths) * trials,
        desc="passkey",
        unit="tok",
        unit_scale=True,
        disable=not (progress and scorer.is_main),
        smoothing=0.1,
    )
    start = time.perf_counter()
    for li, n in enumerate(lengths):
        cases = [
            (
                di,
                t,
                build_passkey(scorer.tokenizer, n, d, random_key(np.random.default_rng([seed, li, di, t]))),
            )
            for di, d in enumerate(depths)
            for t in range(trials)
        ]
        per_batch = max(1, batch_tokens // n)
        for i in range(0, len(cases), per_batch):
            group = cases[i : i + per_batch]
            for (di, t, prompt), (logprob, exact) in zip(group, _score_group(scorer, [c[2] for c in group])):
                rows.append(
                    {
                        "length": n,
                        "depth": depths[di],
                        "trial": t,
                        "key": prompt.key,
                        "needle_start": prompt.needle_start,
                        "distance": prompt.answer_start - prompt.needle_start,
                        "key_logprob": logprob,
                        "exact": exact,
                    }
                )
            bar.set_postfix_str(f"length {n:,}", refresh=False)
            bar.update(n * len(group))
    bar.close()
    scorer.synchronize()
    return {
        "kind": "passkey",
        "model": scorer.description,
        "lengths": lengths,
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "chance_logprob": CHANCE_LOGPROB,
        "accuracy": _grid(rows, lengths, depths, lambda r: float(r["exact"])),
        "key_logprob": _grid(rows, lengths, depths, lambda r: r["key_logprob"]),
        "seconds": time.perf_counter() - start,
        "peak_memory_gib": scorer.peak_memory_gib(),
        "rows": rows,
    }


def _grid(rows, lengths, depths, value) -> list[list[float]]:
    """``[length][depth]`` mean of ``value`` over the trials."""
    return [
        [float(np.mean([value(r) for r in rows if r["length"] == n and r["depth"] == d])) for d in depths]
        for n in lengths
    ]
