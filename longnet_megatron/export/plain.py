"""A dependency-light LongNet GPT in plain PyTorch: the exported model, for inference and tests.

Numerically the network Megatron trains (``longnet_megatron.model``): token embedding, pre-norm layers
(norm -> dilated self-attention with RoPE -> residual, norm -> MLP -> residual), final norm, output
layer (tied to the embedding unless the preset unties it). Attention is the project's own
:func:`longnet_megatron.attention.dilated_attention`, not a copy, so every backend (``reference`` on
CPU, fused kernels on GPU) serves the exported model too.

It needs torch, safetensors and ``longnet_megatron.attention``; no Megatron, no transformers::

    model = LongNetForCausalLM.from_pretrained("exports/tiny-hf")
    logits = model(input_ids)                          # [B, N] -> [B, N, vocab_size]

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


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, dtype: torch.dtype, device=None):
    """cos and sin ``[seq_len, 1, head_dim]`` of Megatron's RotaryEmbedding (non-interleaved halves).

    Same float32 arithmetic as Megatron (inverse frequencies, outer product, cat), cast afterwards.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        a = self.args
        q = apply_rotary(self.q_proj(x).view(b, n, a.num_attention_heads, a.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, n, a.num_key_value_heads, a.head_dim), cos, sin)
        v = self.v_proj(x).view(b, n, a.num_key_value_heads, a.head_dim)
        out = dilated_attention(q, k, v, self.patterns, backend=a.attention_backend)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LongNetModel(nn.Module):
    """Embedding, layers and final norm: hidden states ``[B, N, hidden]``."""

    def __init__(self, args: LongNetArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LongNetBlock(args, i) for i in range(args.num_hidden_layers))
        self.norm = _norm(args)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Positions are 0..N-1, as in Megatron's GPTModel (it ignores position_ids under RoPE).
        cos, sin = rotary_cos_sin(x.shape[1], self.args.head_dim, self.args.rope_theta, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LongNetForCausalLM(nn.Module):
    """The language model: ``forward(input_ids [B, N]) -> logits [B, N, vocab_size]``."""

    def __init__(self, args: LongNetArgs):
        super().__init__()
        self.args = args
        self.model = LongNetModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))

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
