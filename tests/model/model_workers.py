"""What the model tests run inside gloo ranks (module level so that spawn can pickle it).

Starting processes that import Megatron costs seconds, so ONE group of 4 ranks runs every check:
first the TP=1/PP=1 references (each rank computes them from the same seed, so every rank holds the
reference weights without sending them around), then each parallel layout in turn, re-initialising
Megatron's parallel state in place. Each section's outcome is captured separately, so one failing
layout fails only its own tests. The assertions live in the tests.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import MegatronModule

from longnet_megatron.attention import DilatedAttentionConfig
from longnet_megatron.attention.documents import document_bounds
from longnet_megatron.model import build_longnet_gpt, get_preset
from longnet_megatron.model.documents import document_mask
from longnet_megatron.model.rope import ContiguousCPRotaryEmbedding
from longnet_megatron.model.state_dict import (
    globalize_layer_names,
    select_pipeline_stage,
    shard_for_tensor_parallel,
    tensors_only,
)
from longnet_megatron.testing import ParallelLayout, initialize_megatron_parallel

WORLD = 4

SEQ = 192  # not a multiple of 128 or 256: the tiny patterns end in partial segments
BATCH = 2
MICROBATCHES = 4

# name -> preset changes. Tiny patterns (64,128,256)/(1,2,4): with 4 heads, rates 2 and 4 give every
# head a different offset, so a wrong global head index under TP changes the result.
CASES: dict[str, dict] = {
    "mha": {},
    "gqa2": {"num_query_groups": 2},  # 2 kv groups: one per rank under TP=2
    "gqa1": {"num_query_groups": 1},  # fewer groups than TP ranks: Megatron replicates the kv head
    "deep": {"num_layers": 4, "tie_embeddings": True},  # pipeline cases
}


def case_preset(name: str):
    """The tiny preset with the case's changes."""
    return get_preset("tiny").replace(**CASES[name])


def make_batch(seed: int, batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (tokens, labels), identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (batch, seq + 1), generator=gen)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """Global position ids [b, s] (no context parallelism in these tests)."""
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient (clones)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward_direct(model: torch.nn.Module, seed: int = 0) -> dict:
    """Logits of one batch, then mean token loss and its parameter gradients."""
    tokens, labels = make_batch(seed)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens, positions(tokens), None)
    loss = model(tokens, positions(tokens), None, labels=labels).mean()
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads_of(model)}


class SdpaCoreAttention(MegatronModule):
    """Dense causal attention by torch SDPA with Megatron's core-attention call convention."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **_):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def use_sdpa(model: torch.nn.Module) -> None:
    """Replace every layer's core attention by :class:`SdpaCoreAttention` (weights are untouched)."""
    for layer in model.decoder.layers:
        attn = layer.self_attention
        attn.core_attention = SdpaCoreAttention(attn.config)


class _FakeGroup:
    """Just enough of a ProcessGroup for the rotary slice (rank and size)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def rotary_slices(seq: int = 64, cp: int = 4) -> dict:
    """Full rotary angles and each CP rank's slice from ContiguousCPRotaryEmbedding."""
    make = lambda group: ContiguousCPRotaryEmbedding(  # noqa: E731
        kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True, cp_group=group
    )
    full = make(_FakeGroup(0, 1))(seq)
    return {"full": full, "ranks": [make(_FakeGroup(r, cp))(seq) for r in range(cp)]}


# ---------------------------------------------------------------- single rank: references and checks


def reference_cases() -> dict:
    """TP=1/PP=1 results of every case: logits, loss, grads, weights (and the schedule's for 'deep')."""
    out = {}
    for name in CASES:
        torch.manual_seed(100)
        model = build_longnet_gpt(case_preset(name))
        result = forward_backward_direct(model)
        result["state"] = tensors_only(model.state_dict())
        if name == "deep":
            result["schedule"] = run_schedule([model])
        out[name] = result
    return out


def single_rank_checks() -> dict:
    """Checks that need one rank: dense equivalence, per-layer patterns, scale, RoPE slice, CPU shim."""
    out: dict = {}
    # Dense equivalence: one pattern with w >= N and r = 1 is dense causal attention.
    dense_preset = get_preset("tiny").replace(dilated_attention=DilatedAttentionConfig((256,), (1,)))
    for tag, preset in (("dense", dense_preset), ("dilated", get_preset("tiny"))):
        model = build_longnet_gpt(preset)
        dilated = forward_backward_direct(model)
        use_sdpa(model)
        out[tag] = {"dilated": dilated, "sdpa": forward_backward_direct(model)}

    # Per-layer override: layer numbers are Megatron's global 1-based ones.
    per_layer = (DilatedAttentionConfig((32,), (1,)), None)
    model = build_longnet_gpt("tiny", dilated_attention_per_layer=per_layer)
    callable_model = build_longnet_gpt(
        "tiny", dilated_attention_per_layer=lambda n: DilatedAttentionConfig((16 * n,), (1,))
    )
    out["per_layer"] = {
        "sequence": [layer.self_attention.core_attention.dilated_config for layer in model.decoder.layers],
        "callable": [
            layer.self_attention.core_attention.dilated_config for layer in callable_model.decoder.layers
        ],
    }
    scaled = build_longnet_gpt("tiny", softmax_scale=0.5).decoder.layers[0].self_attention.core_attention
    out["softmax_scale"] = {"explicit": scaled.dilated_config.softmax_scale}
    default = model.decoder.layers[0].self_attention.core_attention
    out["softmax_scale"]["default"] = default.dilated_config.softmax_scale
    out["rotary"] = rotary_slices()
    out["shim"] = cpu_shim_checks()
    out["documents"] = document_checks()
    return out


def document_checks() -> dict:
    """Document masking and per-document RoPE positions through the whole GPTModel.

    Logits with the earlier documents' tokens changed (masking on and off), with positions restarting
    at each document (masking on and off), and the RoPE angles a restarted position gets.
    """
    torch.manual_seed(5)
    model = build_longnet_gpt(get_preset("tiny")).eval()
    tokens, _ = make_batch(seed=9)
    ids = torch.zeros_like(tokens)
    ids[0, 70:], ids[0, 130:], ids[1, 20:], ids[1, 150:] = 1, 2, 1, 2  # documents cross segments
    starts = ((0, 70), (1, 20))  # (sequence, first token of its second document)
    changed = tokens.clone()
    for b, start in starts:
        changed[b, :start] = (changed[b, :start] + 1) % 256
    reset = positions(tokens) - document_bounds(ids)[0]

    def logits(t: torch.Tensor, masked: bool, rope: torch.Tensor | None = None) -> torch.Tensor:
        params = None if not masked and rope is None else document_mask(SEQ, ids if masked else None, rope)
        with torch.no_grad():
            return model(t, positions(t), None, packed_seq_params=params)

    masked, unmasked = logits(tokens, True), logits(tokens, False)

    def later(x: torch.Tensor, y: torch.Tensor) -> float:  # largest change past the first documents
        return max((x[b, start:] - y[b, start:]).abs().max().item() for b, start in starts)

    angles = model._preprocess(
        input_ids=tokens, position_ids=positions(tokens), packed_seq_params=document_mask(SEQ, None, reset)
    )[1]  # [s, b, 1, dim]
    plain = model.rotary_pos_emb(SEQ)  # [s, 1, 1, dim]: the angles of positions 0 .. s-1
    return {
        "masked_change": later(masked, logits(changed, True)),
        "unmasked_change": later(unmasked, logits(changed, False)),
        "masked_vs_unmasked": (masked - unmasked).abs().max().item(),
        "reset_masked_vs_masked": (logits(tokens, True, reset) - masked).abs().max().item(),
        "reset_unmasked_vs_unmasked": (logits(tokens, False, reset) - unmasked).abs().max().item(),
        "angle_errors": [
            (angles[start + j, b] - plain[j, 0]).abs().max().item() for b, start in starts for j in (0, 5)
        ],
        "angles_shape": tuple(angles.shape),
    }


def cpu_shim_checks() -> dict:
    """What enable_cpu_megatron (already called by the harness) does to CUDA-only calls."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from longnet_megatron.compat import cpu_megatron_enabled, enable_cpu_megatron

    stack_before = torch._C._len_torch_function_stack()
    enable_cpu_megatron()  # a second call must not stack another mode
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        forked = torch.rand(3)
    after_fork = torch.rand(3)
    return {
        "enabled": cpu_megatron_enabled(),
        "stack": (stack_before, torch._C._len_torch_function_stack()),
        "devices": [
            torch.zeros(2, device="cuda").device.type,
            torch.empty(2, device=torch.cuda.current_device()).device.type,
            torch.ones(2).cuda().device.type,
            torch.ones(2).to("cuda:0").device.type,
            torch.tensor([1], pin_memory=True).device.type,
            torch.ones(1).pin_memory().device.type,
        ],
        "tracker": type(tracker).__name__,
        "fork_differs": not torch.equal(forked, expected_default),
        "default_restored": torch.equal(after_fork, expected_default),
    }


# ---------------------------------------------------------------- tensor parallel


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load an unsharded TP=1/PP=1 state dict into this rank's (TP shard, PP stage) model."""
    full = dict(full)
    # With tied embeddings the last pipeline stage keeps its own copy of the word embeddings.
    full.setdefault("output_layer.weight", full["embedding.word_embeddings.weight"])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shard = shard_for_tensor_parallel(full, parallel_state.get_tensor_model_parallel_rank(), tp)
    model.load_state_dict(select_pipeline_stage(shard, model), strict=True)


def tensor_parallel_checks(references: dict) -> dict:
    """Every TP case on the reference weights; plus one run with a wrong (local) head offset."""
    out = {}
    for name in ("mha", "gqa2", "gqa1"):
        model = build_longnet_gpt(case_preset(name))
        load_full_state(model, references[name]["state"])
        out[name] = forward_backward_direct(model)
        out[name]["heads"] = [
            (a.core_attention.head_offset, a.core_attention.num_heads_per_partition)
            for a in (layer.self_attention for layer in model.decoder.layers)
        ]
        if name == "mha":
            for layer in model.decoder.layers:
                layer.self_attention.core_attention.head_offset = 0
            out["local_head_offsets"] = forward_backward_direct(model)["logits"]
    return out


# ---------------------------------------------------------------- pipeline parallel


def _loss_func(output_tensor: torch.Tensor):
    loss = output_tensor.float().mean()
    # clone: the schedule scales the returned loss in place by 1 / num_microbatches.
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    return model(tokens, positions(tokens), None, labels=labels), _loss_func


def run_schedule(chunks: list[torch.nn.Module]) -> dict:
    """One forward-backward through Megatron's schedule; loss (last stage) and global-name grads."""
    batches = [make_batch(1000 + i, batch=1) for i in range(MICROBATCHES)]
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    iterators = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    grads = {}
    for chunk in chunks:
        grads.update(globalize_layer_names(grads_of(chunk), chunk))
    loss = torch.stack([x["loss"] for x in losses]).mean() if losses else None
    return {"loss": loss, "grads": grads, "micro": [x["loss"] for x in losses]}


def build_stage_chunks(preset, full_state: dict) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage) loaded with the reference weights."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        chunk = build_longnet_gpt(
            preset,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage if vpp > 1 else None,
        )
        load_full_state(chunk, full_state)
        chunks.append(chunk)
    return chunks


def pipeline_checks(references: dict) -> dict:
    """The schedule's loss and this rank's gradients (global layer names, TP-sharded) for 'deep'."""
    chunks = build_stage_chunks(case_preset("deep"), references["deep"]["state"])
    result = run_schedule(chunks)
    result["layers"] = [[layer.layer_number - 1 for layer in c.decoder.layers] for c in chunks]
    return result


# ---------------------------------------------------------------- the whole suite in one group

LAYOUTS: dict[str, tuple[ParallelLayout, Callable[[dict], dict]]] = {
    "tp2": (ParallelLayout(tp=2), tensor_parallel_checks),
    "pp2": (ParallelLayout(pp=2), pipeline_checks),
    "pp2_vpp2": (ParallelLayout(pp=2, vpp=2), pipeline_checks),
    "tp2_pp2": (ParallelLayout(tp=2, pp=2), pipeline_checks),
}


def _section(fn, *args) -> dict:
    """Run one group of checks; keep its result or its traceback."""
    try:
        return {"ok": True, "value": fn(*args)}
    except Exception:  # noqa: BLE001 - reported to the test that owns this section
        return {"ok": False, "error": traceback.format_exc()}


def model_suite_worker() -> dict:
    """All model checks on this rank of a 4-rank group (started with TP = PP = 1, DP = 4)."""
    out = {"references": _section(reference_cases)}
    if torch.distributed.get_rank() == 0:
        out["single"] = _section(single_rank_checks)
    references = out["references"].get("value")
    for key, (layout, checks) in LAYOUTS.items():
        if references is None:
            out[key] = {"ok": False, "error": "the references failed:\n" + out["references"]["error"]}
            continue
        initialize_megatron_parallel(layout)
        out[key] = _section(checks, references)
        out[key]["coords"] = {
            "tp": parallel_state.get_tensor_model_parallel_rank(),
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
        }
    return out
