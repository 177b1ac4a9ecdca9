"""Text from an exported model: greedy, or sampled with temperature and nucleus (top-p) filtering.

With the decode cache (the default) the prompt is prefilled chunk by chunk through the fast dilated
attention backends, then each new token runs one position through the model, reading per layer and
head at most sum_i ceil(w_i / r_i) cached keys (``plain.LongNetCache``). ``use_cache=False`` re-runs
the whole sequence for every token: the reference the cached path is tested against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from longnet_megatron.attention.decode import CacheStats
from longnet_megatron.export.plain import LongNetArgs, LongNetCache, LongNetForCausalLM

# Prompt tokens per prefill call: bounds activation memory (a 1M-token prompt runs in 16 calls).
PREFILL_CHUNK = 65536


@dataclass(frozen=True)
class Generation:
    """Generated ids and how long they took.

    prefill_s: the prompt's forward (which yields the first new token); decode_s: every later token.
    cache: the decode cache's statistics at the end (None without a cache).
    """

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    cache: CacheStats | None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first (None when only one token was generated)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def summary(self) -> str:
        """One line: prefill and decode speed, and the cache's memory beside a dense cache's."""
        line = f"prefill {self.prompt_tokens} tokens {self.prefill_s:.3f} s"
        rate = self.decode_tokens_per_s
        if rate is not None:
            line += f"; decode {len(self.tokens) - 1} tokens {self.decode_s:.3f} s ({rate:.1f} tokens/s)"
        if self.cache is not None:
            line += (
                f"; cache {self.cache.bytes / 1e6:.2f} MB "
                f"(a dense KV cache of {self.cache.tokens} tokens: {self.cache.dense_bytes / 1e6:.2f} MB)"
            )
        return line


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest set of tokens of probability >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p (the first token always stays).
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_generation_args(
    prompt_tokens: int, max_new_tokens: int, temperature: float, top_p: float, position_limit: int
) -> None:
    """Raise a ValueError naming the bad value before any work."""
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    # The last new token is never fed back, so prompt + max_new_tokens - 1 positions are run.
    if prompt_tokens + max_new_tokens - 1 > position_limit:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens and max_new_tokens={max_new_tokens} need "
            f"{prompt_tokens + max_new_tokens - 1} positions; the model has {position_limit} "
            "(max_position_embeddings): shorten the prompt or generate fewer tokens"
        )


def prefill(
    model: LongNetForCausalLM, input_ids: torch.Tensor, cache: LongNetCache, chunk: int = PREFILL_CHUNK
) -> torch.Tensor:
    """Run ``input_ids`` ``[B, N]`` into ``cache`` ``chunk`` tokens at a time; the last position's logits ``[B, V]``."""
    if chunk < 1:
        raise ValueError(f"prefill chunk={chunk} must be at least 1")
    for start in range(0, input_ids.shape[1], chunk):
        logits = model(input_ids[:, start : start + chunk], cache, logits_to_keep=1)
    return logits[:, -1]


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    vocab_limit: int | None,
    generator: torch.Generator,
) -> int:
    logits = logits.float()
    if vocab_limit is not None:
        logits[vocab_limit:] = float("-inf")
    if temperature == 0:
        return int(logits.argmax())
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_timed(
    model: LongNetForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Generation:
    """The new token ids (prompt excluded) generated after ``prompt_ids``, with how long they took.

    temperature 0 is greedy; > 0 samples from softmax(logits / temperature) restricted by ``top_p``.
    ``vocab_limit``: ids at or above it (the embedding's padding rows) are never produced.
    Generation stops after ``eos_id``. The prompt plus the new tokens must fit the model's
    ``max_position_embeddings``. ``use_cache`` (default) decodes with the bounded dilated cache,
    prefilling ``prefill_chunk`` tokens per call; without it every token re-runs the whole sequence.
    """
    check_generation_args(
        len(prompt_ids), max_new_tokens, temperature, top_p, model.args.max_position_embeddings
    )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache = model.new_cache() if use_cache else None
    start = time.perf_counter()
    if cache is not None:
        logits = prefill(model, ids, cache, prefill_chunk)
    else:
        logits = model(ids, logits_to_keep=1)[:, -1]
    new = [_pick(logits[0], temperature, top_p, vocab_limit, generator)]  # int(): waits for the device
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] != eos_id:
        last = torch.tensor([[new[-1]]], device=device)
        if cache is not None:
            logits = model(last, cache)[:, -1]
        else:
            ids = torch.cat([ids, last], dim=1)
            logits = model(ids, logits_to_keep=1)[:, -1]
        new.append(_pick(logits[0], temperature, top_p, vocab_limit, generator))
    decode_s = time.perf_counter() - start
    stats = cache.stats() if cache is not None else None
    return Generation(new, len(prompt_ids), prefill_s, decode_s, stats)


def generate(
    model: LongNetForCausalLM, prompt_ids: list[int], max_new_tokens: int, **options: Any
) -> list[int]:
    """The new token ids of :func:`generate_timed` (same options), without the timings."""
    return generate_timed(model, prompt_ids, max_new_tokens, **options).tokens


def sample_text(
    folder: str,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    tokenizer_spec: str | None = None,
    attention_backend: str | None = None,
    device: str = "cpu",
    use_cache: bool = True,
    prefill_chunk: int = PREFILL_CHUNK,
) -> tuple[str, Generation]:
    """Continuation of ``prompt`` by the model exported in ``folder`` (with the tokenizer it was
    trained with), and the :class:`Generation` record (timings, cache statistics)."""
    from longnet_megatron.export.tokenizer_files import load_tokenizer

    limit = LongNetArgs.from_folder(folder).max_position_embeddings
    tokenizer = load_tokenizer(folder, tokenizer_spec)
    prompt_ids = tokenizer.encode(prompt)
    check_generation_args(len(prompt_ids), max_new_tokens, temperature, top_p, limit)  # before loading
    # The CPU attention backend computes in float32 (or 64): upcast a bf16 / fp16 export there.
    dtype = torch.float32 if torch.device(device).type == "cpu" else None
    model = LongNetForCausalLM.from_pretrained(
        folder, attention_backend=attention_backend, device=device, dtype=dtype
    )
    args = model.args
    generation = generate_timed(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tokenizer.eod_id,
        vocab_limit=min(tokenizer.vocab_size, args.vocab_size),
        seed=seed,
        use_cache=use_cache,
        prefill_chunk=prefill_chunk,
    )
    return tokenizer.decode(generation.tokens), generation
