"""Text from an exported model: greedy, or sampled with temperature and nucleus (top-p) filtering.

No KV cache: each new token runs the model over the whole (cropped) prefix. Dilated attention has no
incremental form in this project yet, so this costs O(steps * forward(prefix)); fine for samples and
evaluation prompts, not for serving long generations.
"""

from __future__ import annotations

import torch


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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    context_length: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids (prompt excluded) generated after ``prompt_ids``.

    temperature 0 is greedy; > 0 samples from softmax(logits / temperature) restricted by ``top_p``.
    ``vocab_limit``: ids at or above it (the embedding's padding rows) are never produced.
    ``context_length``: only the last that many tokens are fed (the model's training length).
    Generation stops after ``eos_id``.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-context_length:] if context_length else ids
        logits = model(torch.tensor([window], device=device))[0, -1].float()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(token)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new


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
) -> str:
    """Continuation of ``prompt`` by the model exported in ``folder``, with the tokenizer it was trained with."""
    from longnet_megatron.export.plain import LongNetForCausalLM
    from longnet_megatron.export.tokenizer_files import load_tokenizer

    # The CPU attention backend computes in float32 (or 64): upcast a bf16 / fp16 export there.
    dtype = torch.float32 if torch.device(device).type == "cpu" else None
    model = LongNetForCausalLM.from_pretrained(
        folder, attention_backend=attention_backend, device=device, dtype=dtype
    )
    tokenizer = load_tokenizer(folder, tokenizer_spec)
    args = model.args
    new = generate(
        model,
        tokenizer.encode(prompt),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tokenizer.eod_id,
        vocab_limit=min(tokenizer.vocab_size, args.vocab_size),
        context_length=args.max_position_embeddings,
        seed=seed,
    )
    return tokenizer.decode(new)
