"""A dependency-light LongNet GPT in plain PyTorch: the exported model, for inference and tests.

Numerically the network Megatron trains (``longnet_megatron.model``): token embedding, pre-norm layers
(norm -> dilated self-attention with RoPE -> residual, norm -> MLP -> residual), final norm, output
layer (tied to the embedding unless the preset unties it). Attention is the project's own
:func:`longnet_megatron.attention.dilated_attention`, not a copy, so every backend (``reference`` on
CPU, fused kernels on GPU) serves the exported model too.

It needs torch, safetensors and ``longnet_megatron.attention``; no Megatron, no transformers::

    model = LongNetForCausalLM.from_pretrained("exports/tiny-hf")
    logits = model(input_ids)                          # [B, N] -> [B, N, vocab_size]
    cache = model.new_cache()                          # bounded dilated KV cache (LongNetCache)
    logits = model(prompt, cache, logits_to_keep=1)    # prefill; then one token at a time:
    logits = model(next_ids, cache)                    # equals the full forward's last position

Parameter names follow Hugging Face's Llama-family convention (``model.layers.{i}.self_attn.q_proj``,
...) so the same modules sit inside the transformers wrapper (``hf_model/modeling_longnet.py``) and
``model.safetensors`` loads into either.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longnet_megatron.attention import DilatedAttentionConfig, dilated_attention
from longnet_megatron.attention.decode import DECODE_MAX_TOKENS, CacheStats, DilatedKVCache

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Megatron's activation callables by the name config.json stores.
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


@dataclass
class LongNetArgs:
    """Architecture of an exported LongNet GPT; the model's keys of ``config.json``.

    vocab_size is the (padded) size of the embedding Megatron trained; tokenizer_vocab_size the real
    vocabulary (ids at or above it are padding and never generated). ``dilated_attention`` holds one
    :meth:`DilatedAttentionConfig.to_dict` per layer (causal, softmax scale included).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    dilated_attention: list[dict[str, Any]]
    max_position_embeddings: int
    tokenizer_vocab_size: int | None = None
    rope_theta: float = 10000.0
    normalization: str = "LayerNorm"
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    bias: bool = True
    tie_word_embeddings: bool = True
    attention_backend: str = "auto"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.normalization!r}: expected 'LayerNorm' or 'RMSNorm'")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if len(self.dilated_attention) != self.num_hidden_layers:
            raise ValueError(
                f"dilated_attention has {len(self.dilated_attention)} entries for "
                f"{self.num_hidden_layers} layers (one pattern set per layer)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def layer_patterns(self, index: int) -> DilatedAttentionConfig:
        """Dilated attention configuration of 0-based layer ``index``."""
        return DilatedAttentionConfig.from_dict(self.dilated_attention[index])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongNetArgs:
        """From ``config.json`` (or a transformers config dict); other keys (transformers' own, the
        Megatron record) are ignored."""
        fields = dataclasses.fields(cls)
        known = {f.name: data[f.name] for f in fields if f.name in data}
        missing = sorted(f.name for f in fields if f.name not in known and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"LongNet config is missing {missing}")
        return cls(**known)

    @classmethod
    def from_folder(cls, folder: str | Path) -> LongNetArgs:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not an exported LongNet folder")
        data = json.loads(path.read_text())
        if data.get("model_type") != "longnet":
            raise ValueError(f"{path}: model_type={data.get('model_type')!r}, expected 'longnet'")
        return cls.from_dict(data)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, dtype: torch.dtype, device=None, start: int = 0):
    """cos and sin ``[seq_len, 1, head_dim]`` of Megatron's RotaryEmbedding (non-interleaved halves),
    for positions ``start`` .. ``start + seq_len - 1``.

    Same float32 arithmetic as Megatron (inverse frequencies, outer product, cat), cast afterwards;
    each position's values do not depend on ``start`` (exact integers up to 2^24).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(start, start + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return torch.cos(emb).to(dtype), torch.sin(emb).to(dtype)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, N, H, D]``: rotate the two halves of the head dimension."""
    x1, x2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


def _norm(args: LongNetArgs) -> nn.Module:
    if args.normalization == "RMSNorm":
        return nn.RMSNorm(args.hidden_size, eps=args.layer_norm_eps)
    return nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class LongNetAttention(nn.Module):
    """Self-attention: q/k/v projections, RoPE, dilated attention over all heads, output projection."""

    def __init__(self, args: LongNetArgs, layer_index: int):
        super().__init__()
        self.args = args
        self.patterns = args.layer_patterns(layer_index)
        hq, hkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, hq * d, bias=args.bias)
        self.k_proj = nn.Linear(args.hidden_size, hkv * d, bias=args.bias)
        self.v_proj = nn.Linear(args.hidden_size, hkv * d, bias=args.bias)
        self.o_proj = nn.Linear(hq * d, args.hidden_size, bias=args.bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DilatedKVCache | None = None
    ) -> torch.Tensor:
        b, n, _ = x.shape
        a = self.args
        q = apply_rotary(self.q_proj(x).view(b, n, a.num_attention_heads, a.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, n, a.num_key_value_heads, a.head_dim), cos, sin)
        v = self.v_proj(x).view(b, n, a.num_key_value_heads, a.head_dim)
        if cache is None:
            out = dilated_attention(q, k, v, self.patterns, backend=a.attention_backend)
        else:
            out = cache.attend(q, k, v, backend=a.attention_backend)
        return self.o_proj(out.reshape(b, n, -1))


class LongNetMLP(nn.Module):
    """up -> activation -> down; gated (SwiGLU-style) multiplies act(gate) by up."""

    def __init__(self, args: LongNetArgs):
        super().__init__()
        self.act = ACTIVATIONS[args.hidden_act]
        if args.gated_mlp:
            self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LongNetBlock(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, args: LongNetArgs, layer_index: int):
        super().__init__()
        self.input_layernorm = _norm(args)
        self.self_attn = LongNetAttention(args, layer_index)
        self.post_attention_layernorm = _norm(args)
        self.mlp = LongNetMLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DilatedKVCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LongNetModel(nn.Module):
    """Embedding, layers and final norm: hidden states ``[B, N, hidden]``."""

    def __init__(self, args: LongNetArgs):
        super().__init__()
        self.args = args
        self.cache_layout = cache_layout(args)  # what a decode cache must have been made for
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LongNetBlock(args, i) for i in range(args.num_hidden_layers))
        self.norm = _norm(args)

    def forward(self, input_ids: torch.Tensor, cache: LongNetCache | None = None) -> torch.Tensor:
        start = 0
        if cache is not None:
            cache.check_fits(self.cache_layout, input_ids.shape[1])
            start = cache.get_seq_length()
        x = self.embed_tokens(input_ids)
        # Positions are 0..N-1 (after the cached ones), as in Megatron's GPTModel (it ignores
        # position_ids under RoPE).
        a = self.args
        cos, sin = rotary_cos_sin(x.shape[1], a.head_dim, a.rope_theta, x.dtype, x.device, start=start)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        return self.norm(x)


class LongNetForCausalLM(nn.Module):
    """The language model: ``forward(input_ids [B, N]) -> logits [B, N, vocab_size]``.

    With a ``cache`` (:meth:`new_cache`) the ids continue the cached sequence and the cache is
    updated in place, as transformers' caches are; ``logits_to_keep`` = k > 0 returns only the last
    k positions' logits (transformers' argument: a long prefill never builds ``[N, vocab]`` logits).
    """

    def __init__(self, args: LongNetArgs):
        super().__init__()
        self.args = args
        self.model = LongNetModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LongNetCache | None = None,
        *,
        past_key_values: LongNetCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        hidden = self.model(input_ids, one_cache(cache, past_key_values))
        return self.lm_head(keep_positions(hidden, logits_to_keep))

    def new_cache(self, *, max_decode_tokens: int = DECODE_MAX_TOKENS) -> LongNetCache:
        """An empty decode cache for this model (buffers come with the first call)."""
        return LongNetCache(self.args, max_decode_tokens=max_decode_tokens)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        attention_backend: str | None = None,
    ) -> LongNetForCausalLM:
        """Load an exported folder (``config.json`` + ``model.safetensors`` or its sharded index).

        dtype: None keeps the stored dtype. attention_backend overrides the stored one (e.g.
        ``"reference"`` on CPU, a fused backend on GPU).
        """
        args = LongNetArgs.from_folder(folder)
        if attention_backend is not None:
            args.attention_backend = attention_backend
        state = load_safetensors_folder(folder)
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(_with_tied(state, args), strict=True, assign=True)
        if args.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.to(device=device, dtype=dtype)
        return model.eval()


def one_cache(cache: LongNetCache | None, past_key_values: LongNetCache | None) -> LongNetCache | None:
    """The cache given as ``cache`` or by its older transformers name ``past_key_values``."""
    if past_key_values is not None:
        if cache is not None and cache is not past_key_values:
            raise ValueError(
                "pass the cache once: as cache= or as past_key_values= (its older name), not both"
            )
        cache = past_key_values
    if cache is not None and not isinstance(cache, LongNetCache):
        raise ValueError(
            f"LongNet decodes with its own cache (model.new_cache()), not a {type(cache).__name__}: "
            "dilated attention keeps only the keys of each pattern's current segment"
        )
    return cache


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are wanted: the last k for an int k > 0 (0: all), or an index tensor."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep} must be >= 0 (0 keeps every position)")
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return hidden[:, logits_to_keep]


def cache_layout(args: LongNetArgs) -> dict[str, Any]:
    """What a decode cache depends on: heads, head size, position limit and every layer's patterns."""
    return {
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_position_embeddings,
        "dilated_attention": [args.layer_patterns(i).to_dict() for i in range(args.num_hidden_layers)],
    }


class LongNetCache:
    """The decode cache of a :class:`LongNetForCausalLM`: one :class:`DilatedKVCache` per layer.

    Its methods are those of transformers' ``Cache`` (``get_seq_length``, ``crop``, ``reset``,
    ``reorder_cache``, ``batch_select_indices``, ...), so the transformers wrapper's cache is this
    class on top of ``transformers.Cache``, and ``generate`` drives either. Per layer and query head
    it holds at most sum_i ceil(w_i / r_i) keys, whatever the context (:meth:`stats`).
    """

    is_compileable = False
    is_croppable = True  # across a segment end only while recording (activate_past_recording)

    def __init__(self, args: LongNetArgs, *, max_decode_tokens: int = DECODE_MAX_TOKENS) -> None:
        self.layout = cache_layout(args)
        self.layers = [
            DilatedKVCache(
                args.layer_patterns(i),
                args.num_attention_heads,
                args.num_key_value_heads,
                args.head_dim,
                max_positions=args.max_position_embeddings,
                max_decode_tokens=max_decode_tokens,
            )
            for i in range(args.num_hidden_layers)
        ]

    def check_fits(self, layout: dict[str, Any], num_tokens: int) -> None:
        """Raise a clear error unless ``num_tokens`` more tokens of a model of ``layout`` fit this cache."""
        if layout != self.layout:
            diff = sorted(key for key in layout if layout[key] != self.layout.get(key))
            raise ValueError(
                f"this cache was made for another model or layout (it differs in {', '.join(diff)}): "
                "make one with model.new_cache()"
            )
        start, limit = self.get_seq_length(), layout["max_position_embeddings"]
        if start + num_tokens > limit:
            raise ValueError(
                f"positions {start}..{start + num_tokens - 1} pass the model's position limit "
                f"(max_position_embeddings={limit})"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached so far."""
        return self.layers[layer_idx].length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """The most tokens the cache may hold: the model's position limit."""
        return self.layout["max_position_embeddings"]

    @property
    def batch_size(self) -> int:
        """Batch size of the cached sequences (-1 before the first call)."""
        batch = self.layers[0].batch
        return -1 if batch is None else batch

    @property
    def is_initialized(self) -> bool:
        return self.layers[0].batch is not None

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens in every layer (all or none)."""
        for layer in self.layers:
            layer.check_crop(tokens_to_remove)
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def activate_past_recording(self) -> None:
        """Keep emptied segments until the next crop (transformers' speculative decoding protocol)."""
        for layer in self.layers:
            layer.activate_past_recording()

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.repeat_batch(repeats)

    def stats(self) -> CacheStats:
        """All layers together; ``key_bound`` is per layer and query head (the largest layer's)."""
        per_layer = [layer.stats() for layer in self.layers]
        return CacheStats(
            tokens=per_layer[0].tokens,
            bytes=sum(s.bytes for s in per_layer),
            cached_keys=sum(s.cached_keys for s in per_layer),
            key_bound=max(s.key_bound for s in per_layer),
            attended_keys=sum(s.attended_keys for s in per_layer),
            dense_bytes=sum(s.dense_bytes for s in per_layer),
        )


def _with_tied(state: dict[str, torch.Tensor], args: LongNetArgs) -> dict[str, torch.Tensor]:
    if args.tie_word_embeddings:
        state = dict(state)
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a damaged one is a ValueError naming it (not safetensors' own error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is unreadable ({e}): truncated or not a safetensors file") from e


def load_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return _load_weights_file(single)
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index} is not a safetensors index ({e}): truncated?") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {index} but missing")
        state.update(_load_weights_file(path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{folder}: tensors {missing[:5]} are in the index but in no shard")
    return state
