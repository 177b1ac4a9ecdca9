"""What each rank runs in the context-parallel tests (module level, so spawned ranks can import it).

Every check compares this rank's slice of a CP run against the same slice of a single-process run on
the whole sequence (and, for attention, against the float64 oracle), and returns relative errors so
the parent process asserts with readable messages. Several checks share one process group: starting
ranks that import Megatron costs seconds, so the tests batch everything per world size.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longnet_megatron.attention import DilatedAttentionConfig, dilated_attention
from longnet_megatron.attention.backends import ReferenceBackend
from longnet_megatron.attention.cp import last_comm_stats
from tests.attention.cases import random_documents
from tests.attention.oracle import oracle_attention


@dataclass(frozen=True)
class CPCase:
    """A dilated attention problem split over ``cp`` ranks (and ``tp`` head shards).

    ``n`` is the GLOBAL length; ``base`` the global position of token 0; ``head_offset`` the global
    index of head 0 of the whole (unsplit) head range; ``documents`` > 0: documents of mean length
    1 / documents tokens (packed-sequence masking, documents crossing rank boundaries).
    """

    name: str
    n: int
    heads: int
    kv_heads: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool
    batch: int = 1
    head_dim: int = 8
    head_offset: int = 0
    base: int = 0
    oracle: bool = True
    dtype: torch.dtype = torch.float32
    documents: float = 0.0

    def document_ids(self, seed: int) -> torch.Tensor | None:
        """The global ``[batch, n]`` document ids of the case (None without documents)."""
        return random_documents(self.batch, self.n, seed, self.documents) if self.documents else None

    @property
    def config(self) -> DilatedAttentionConfig:
        return DilatedAttentionConfig(self.segment_lengths, self.dilation_rates, causal=self.causal)


class SquareOnlyBackend(ReferenceBackend):
    """The reference kernel, refusing the rectangular calls that not every fused backend implements."""

    name = "square-only-reference"

    def forward(self, q, k, v, *, causal, scale):  # noqa: D102
        assert q.shape[1] == k.shape[1], f"rectangular call {q.shape[1]} x {k.shape[1]}"
        return super().forward(q, k, v, causal=causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):  # noqa: D102
        assert q.shape[1] == k.shape[1], f"rectangular call {q.shape[1]} x {k.shape[1]}"
        return super().backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _tensors(case: CPCase, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(case.batch, case.n, case.heads, case.head_dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(case.batch, case.n, case.kv_heads, case.head_dim, generator=gen) for _ in range(2))
    return q, k, v, dout


def _full_run(
    case: CPCase, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, documents: torch.Tensor | None
) -> list[torch.Tensor]:
    """Output and dq, dk, dv of the single-rank computation over the whole sequence (or the oracle)."""
    q, k, v, dout = (t.to(dtype).requires_grad_(i < 3) for i, t in enumerate(tensors))
    if dtype == torch.float64:
        out = oracle_attention(
            q,
            k,
            v,
            case.segment_lengths,
            case.dilation_rates,
            case.causal,
            head_offset=case.head_offset,
            position_offset=case.base,
            document_ids=documents,
        )
    else:
        out = dilated_attention(
            q, k, v, case.config, head_offset=case.head_offset, position_offset=case.base, backend="reference",
            document_ids=documents,
        )  # fmt: skip
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def check_attention(
    case: CPCase, cp_group: dist.ProcessGroup, tp_rank: int = 0, tp_size: int = 1, seed: int = 0
) -> dict:
    """Errors of this rank's CP output and gradients vs the whole-sequence run, and its byte counts."""
    cp_rank, cp_size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
    n = case.n // cp_size
    hq, hkv = case.heads // tp_size, case.kv_heads // tp_size
    rows, q_heads, kv_heads = (
        slice(cp_rank * n, (cp_rank + 1) * n),
        slice(tp_rank * hq, (tp_rank + 1) * hq),
        slice(tp_rank * hkv, (tp_rank + 1) * hkv),
    )
    tensors = _tensors(case, seed)
    documents = case.document_ids(seed)
    q, k, v, dout = (
        t[:, rows, heads].to(case.dtype, copy=True)
        for t, heads in zip(tensors, (q_heads, kv_heads, kv_heads, q_heads))
    )
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = dilated_attention(
        q,
        k,
        v,
        case.config,
        head_offset=case.head_offset + tp_rank * hq,
        position_offset=case.base + cp_rank * n,
        backend=SquareOnlyBackend(),
        cp_group=cp_group,
        document_ids=None if documents is None else documents[:, rows],
    )
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]
    stats = last_comm_stats()
    result = {"case": case.name, "cp_rank": cp_rank, "tp_rank": tp_rank, "errors": {}}
    references = {"single_rank": torch.float32}
    if case.oracle:
        references["oracle"] = torch.float64
    for ref_name, dtype in references.items():
        full = _full_run(case, tensors, dtype, documents)
        for name, x, ref, heads in zip(
            ("out", "dq", "dk", "dv"), got, full, (q_heads, q_heads, kv_heads, kv_heads)
        ):
            result["errors"][f"{ref_name}/{name}"] = rel_err(x, ref[:, rows, heads])
    result["forward_bytes"] = dict(stats.forward_bytes) if stats else {}
    result["backward_bytes"] = dict(stats.backward_bytes) if stats else {}
    return result


def attention_checks(cases: list[CPCase], layout=None) -> list[dict]:
    """Run every case on this rank: CP over the whole world, or over the CP group of a Megatron layout."""
    if layout is None:
        group, tp_rank, tp_size = dist.group.WORLD, 0, 1
    else:
        from megatron.core import parallel_state

        from longnet_megatron.testing import initialize_megatron_parallel

        initialize_megatron_parallel(layout)
        group = parallel_state.get_context_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return [check_attention(case, group, tp_rank, tp_size, seed=i) for i, case in enumerate(cases)]


def _model_step(model, batch: dict, cp_group: dist.ProcessGroup | None, seq_length: int = 0) -> dict:
    """Logits, the token-averaged loss and parameter gradients, averaged over CP as Megatron does.

    Each CP rank sums the loss of its own tokens and divides by the token count of the whole
    sequence; gradients are then summed over the CP group (Megatron's DDP reduces over data x context
    parallel ranks), which gives the gradient of the global mean loss.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from longnet_megatron.model.documents import document_mask

    model.zero_grad(set_to_none=True)
    params = document_mask(seq_length, batch["document_ids"]) if "document_ids" in batch else None
    logits = model(
        batch["tokens"], batch["position_ids"], None, packed_seq_params=params
    )  # [b, s, vocab / tp]
    losses = vocab_parallel_cross_entropy(
        logits.transpose(0, 1).float().contiguous(), batch["labels"].transpose(0, 1).contiguous()
    )
    mask = batch["loss_mask"].transpose(0, 1).float()
    count = mask.sum()
    if cp_group is not None:
        dist.all_reduce(count, group=cp_group)
    loss = (losses * mask).sum() / count
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    total = loss.detach().clone()
    if cp_group is not None:
        dist.all_reduce(total, group=cp_group)
        for grad in grads.values():
            dist.all_reduce(grad, group=cp_group)
    return {"logits": logits.detach(), "loss": total, "grads": grads}


def check_model(tp: int, cp: int, seq_length: int = 256, batch_size: int = 2, documents: float = 0.0) -> dict:
    """The tiny LongNet GPTModel under TP=tp x CP=cp vs TP=tp x CP=1 on the same weights and tokens
    (with document masking for ``documents`` > 0, documents of mean length 1 / documents)."""
    from megatron.core import parallel_state

    from longnet_megatron.model import build_longnet_gpt, get_preset
    from longnet_megatron.parallel.batch import split_batch_for_this_cp_rank
    from longnet_megatron.testing import ParallelLayout, initialize_megatron_parallel

    preset = get_preset("tiny").replace(seq_length=seq_length)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, preset.vocab_size, (batch_size, seq_length + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": (torch.rand(batch_size, seq_length, generator=gen) > 0.1).float(),
        "position_ids": torch.arange(seq_length).expand(batch_size, -1),
    }
    if documents:
        batch["document_ids"] = random_documents(batch_size, seq_length, seed=7, rate=documents)

    initialize_megatron_parallel(ParallelLayout(tp=tp))
    model = build_longnet_gpt(preset, attention_backend_name="reference", use_te=False)
    weights = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    ref = _model_step(model, batch, None, seq_length)

    initialize_megatron_parallel(ParallelLayout(tp=tp, cp=cp))
    model = build_longnet_gpt(preset, attention_backend_name="reference", use_te=False)
    model.load_state_dict(weights)
    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    got = _model_step(model, split_batch_for_this_cp_rank(batch), cp_group, seq_length)

    n = seq_length // cp
    return {
        "tp": tp,
        "cp": cp,
        "logits": rel_err(got["logits"], ref["logits"][:, cp_rank * n : (cp_rank + 1) * n]),
        "loss": abs(got["loss"].item() - ref["loss"].item()),
        "loss_value": ref["loss"].item(),
        "grads": max(rel_err(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
        "forward_bytes": dict(last_comm_stats().forward_bytes),
    }


# Cases named for what they exercise; n is the global length. "small": every segment fits in a chunk.
CP2_CASES = [
    CPCase("small_patterns_local", 64, 4, 4, (8, 16, 32), (1, 2, 4), True),
    CPCase("large_patterns_causal", 64, 4, 4, (8, 32, 64, 128), (1, 2, 4, 8), True),
    CPCase("large_patterns_noncausal", 64, 4, 4, (8, 32, 64, 128), (1, 2, 4, 8), False, batch=2),
    CPCase("ragged_causal", 70, 6, 6, (5, 12, 30, 50), (1, 3, 7, 6), True),
    CPCase("ragged_noncausal_base", 70, 6, 2, (5, 12, 30, 50), (1, 3, 7, 6), False, head_offset=6, base=9),
    CPCase("gqa_causal", 64, 8, 2, (8, 48, 100), (1, 4, 8), True, head_offset=4),
    CPCase("paper_rates", 96, 12, 12, (4, 8, 16, 32, 64), (1, 2, 4, 6, 12), True, oracle=False),
    CPCase("bf16_large_patterns", 64, 4, 4, (8, 32, 64), (1, 2, 4), True, oracle=False, dtype=torch.bfloat16),
]
# Document masking: documents of mean length 1 / documents tokens, crossing segment and rank boundaries.
CP2_CASES += [
    CPCase("docs_large_causal", 64, 4, 4, (8, 32, 64, 128), (1, 2, 4, 8), True, documents=0.05),
    CPCase(
        "docs_ragged_noncausal",
        70,
        6,
        2,
        (5, 12, 30, 50),
        (1, 3, 7, 6),
        False,
        batch=2,
        head_offset=6,
        base=9,
        documents=0.15,
    ),  # fmt: skip
    CPCase("docs_one_token", 64, 4, 2, (8, 48, 100), (1, 4, 8), True, documents=0.6),
]
CP4_CASES = [
    CPCase("small_patterns_local", 128, 4, 4, (8, 16, 32), (1, 2, 4), True),
    CPCase("large_patterns_causal", 128, 4, 4, (8, 32, 64, 128), (1, 2, 4, 8), True),
    CPCase("ragged_noncausal", 140, 6, 3, (5, 12, 30, 50, 150), (1, 3, 7, 6, 11), False),
    CPCase("ragged_gqa_causal", 140, 8, 2, (7, 20, 45, 160), (1, 3, 6, 9), True, head_offset=8),
]


def random_cp_case(seed: int, cp: int) -> CPCase:
    """A random valid case for ``cp`` ranks: segments from 2 tokens to twice the sequence, ragged rates,
    GQA, head and position offsets."""
    rng = random.Random(seed)
    n = rng.randint(3, 24) * cp
    count = rng.randint(1, 4)
    ws = sorted(rng.sample(range(2, 2 * n + 10), count))
    rs = [rng.randint(1, min(w, 13)) for w in ws]
    rs[rng.randrange(count)] = 1
    kv, group = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    return CPCase(
        f"random_{seed}",
        n,
        kv * group,
        kv,
        tuple(ws),
        tuple(rs),
        rng.random() < 0.5,
        batch=rng.choice([1, 2]),
        head_dim=4,
        head_offset=group * rng.choice([0, 1, 5]),
        base=rng.choice([0, 0, rng.randint(1, 50)]),
    )


CP4_CASES += [random_cp_case(seed, 4) for seed in range(8)]
# Documents from one token to longer than a rank's chunk (a document spanning three ranks).
CP4_CASES += [
    dataclasses.replace(random_cp_case(seed, 4), name=f"docs_random_{seed}", documents=rate)
    for seed, rate in zip(range(8, 14), (0.6, 0.2, 0.08, 0.03, 0.01, 0.005))
]
CP4_CASES += [
    CPCase(
        "docs_across_ranks",
        128,
        4,
        2,
        (8, 32, 128, 256),
        (1, 2, 4, 8),
        causal,
        batch=2,
        documents=0.01,
        head_offset=2,
    )  # fmt: skip
    for causal in (True, False)
]
# CP = 3 (a group of three of the four ranks).
CP3_CASES = [
    dataclasses.replace(random_cp_case(seed, 3), name=f"cp3_random_{seed}", documents=rate)
    for seed, rate in zip(range(20, 26), (0.0, 0.5, 0.1, 0.03, 0.01, 0.0))
]

# TP=2 x CP=2: heads split over TP ranks, so the CP ranks see head_offset = tp_rank * heads / 2.
TP2_CP2_CASES = [
    CPCase("tp2_large_causal", 64, 8, 8, (8, 32, 64), (1, 2, 4), True),
    CPCase("tp2_ragged_gqa_noncausal", 70, 8, 4, (5, 30, 70), (1, 3, 6), False),
    CPCase("tp2_docs_gqa_causal", 64, 8, 4, (8, 32, 64), (1, 2, 4), True, documents=0.05),
    CPCase("tp2_docs_noncausal", 70, 8, 8, (5, 30, 70), (1, 3, 6), False, documents=0.1),
]
# Bytes per pattern when N doubles and every crossing pattern's (w, r) doubles (w/r fixed).
BYTES_CASES = [
    CPCase("bytes_n", 64, 4, 4, (8, 32, 64, 128), (1, 2, 4, 8), True, oracle=False),
    CPCase("bytes_2n", 128, 4, 4, (16, 64, 128, 256), (1, 4, 8, 16), True, oracle=False),
]


def cp3_checks(cases: list[CPCase]) -> list[dict]:
    """The cases over a CP group of ranks 0, 1, 2 (every rank takes part in creating it)."""
    group = dist.new_group([0, 1, 2])
    if dist.get_rank() not in (0, 1, 2):
        return []
    return [check_attention(case, group, seed=i) for i, case in enumerate(cases)]


def run_all() -> dict:
    """Everything the tests check, on 4 ranks in one process group (spawning ranks is the slow part).

    Started with Megatron's layout cp=4 (which also turns on the CPU shim). CP = 4 runs over the whole
    world, CP = 3 over ranks 0-2, CP = 2 as Megatron's layout cp=2 (two data-parallel replicas of a CP
    pair), TP = 2 x CP = 2 as Megatron's layout tp=2, cp=2.
    """
    from longnet_megatron.testing import ParallelLayout

    cp2 = ParallelLayout(cp=2)
    return {
        "cp4": attention_checks(CP4_CASES),
        "cp3": cp3_checks(CP3_CASES),
        "bytes_cp4": attention_checks(BYTES_CASES),
        "cp2": attention_checks(CP2_CASES, cp2),
        "bytes_cp2": attention_checks(BYTES_CASES, cp2),
        "tp2_cp2": attention_checks(TP2_CP2_CASES, ParallelLayout(tp=2, cp=2)),
        "model_cp2": check_model(tp=1, cp=2),
        "model_tp2_cp2": check_model(tp=2, cp=2),
        "model_cp2_documents": check_model(tp=1, cp=2, documents=0.02),
        "model_tp2_cp2_documents": check_model(tp=2, cp=2, documents=0.02),
    }
