"""The memory planner: the least activation recomputation whose modelled footprint fits the GPU.

``model.recompute=auto`` (the default) is resolved here before the model is built::

    plan = plan_recompute(MemoryInputs.from_job(resolved), usable_bytes(device_bytes))
    plan.recompute            # Recompute: Megatron's recompute_granularity / _method / _num_layers
    plan.describe()           # the "memory plan: ..." log line

Candidates, cheapest recomputation first (forward FLOPs recomputed per micro-batch): none; selective
(Megatron's ``recompute_modules=["core_attn"]``); block recompute of the first k layers of each
pipeline stage (``recompute_method=block``, ``recompute_num_layers=k``); full (every layer); full with
the MLP in sequence chunks (``model.mlp_chunk_tokens``: the rebuilt layer keeps one chunk's fc1/GeLU
activations, at one more MLP forward per layer); and that plus the saved inputs of the first k layers
in host memory (``model.offload_layer_inputs``, fewest k first; single pipeline stage only; within a
host budget). The first whose modelled peak fits the usable memory (and whose offloaded bytes fit the
host budget) is chosen; when none fits, the smallest footprint within the host budget, and the plan
says by how much it is over.

The footprint (bytes on the worst rank: the first pipeline stage, or the last with the loss) is
Megatron-LM's own model (``theoretical_memory_usage.py``, Korthikanti et al. 2022, table 2) with this
project's layers and constants calibrated on measured peaks (docs/training.md, "The memory planner"):

* weights, gradients, optimizer: per parameter of the rank, its dtype (2 bytes bf16), the fp32 gradient
  buffer (4) and fp32 main weights + Adam moments (4 + 8, fp32 runs: 8) divided over the
  distributed optimizer's shards (dp x cp); FP8 adds TE's cached FP8 weight and its transpose (2);
* activations per token of a micro-batch on a rank (``mbs x L / cp``), at 2-byte activations: a layer
  keeps ``LAYER_H x h + LAYER_FFN x f`` bytes (``REPLICATED_H x h`` of it on every tensor-parallel rank
  unless sequence parallelism splits it too, the rest over tp), a recomputed layer only its input
  (``INPUT_H x h``), and ``OUTSIDE_H x h`` live outside the layers (embedding output, final norm, the
  loss's input); selective recompute frees the core attention's log-sum-exp (and its output copy when
  mbs > 1: the dilated attention keeps q, k, v, output and log-sum-exp, nothing quadratic);
* transients: the loss (chunked: one chunk's logits, ``8 x C x V / tp``, and the fp32 output-weight
  gradient; plain: ``6 x T x V / tp``) at the start of backward, and during backward one layer's
  recomputed activations plus its gradients in flight (``BACKWARD_H x h`` per token);
* pipeline parallelism: the first stage holds ``min(m, pp)`` micro-batches (interleaved: Megatron's
  ``1 + (pp - 1) / (pp x vpp)`` penalty); the dilated attention's O(N) workspace is in the constants.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longnet_megatron.train.job import ResolvedJob
from longnet_megatron.train.metrics import attention_pairs

GIB = 2**30

# Bytes per token and layer per unit of hidden (h) or MLP (f) size at 2-byte activations, fitted to the
# measured peaks of tools/bench_train.py (TE layers, dilated attention sdpa; docs/training.md).
LAYER_H = 21.0
LAYER_FFN = 4.0  # fc1's output and the GeLU's output (Megatron-LM's 4 f / h)
REPLICATED_H = 10.0  # the layer norms' inputs and outputs (Korthikanti et al.'s "10" without SP)
INPUT_H = 2.0  # a checkpointed layer keeps its bf16 input
OUTSIDE_H = 6.0  # embedding output, final layer norm, the loss's saved input
BACKWARD_H = 6.0  # one layer's activation gradients in flight during backward
PLAIN_LOSS_BYTES = 6.0  # per token and vocabulary entry: bf16 logits + the fp32 softmax kept for backward
CHUNK_LOSS_BYTES = 8.0  # per chunk token and vocabulary entry: logits and softmax, forward and backward

# The planner's MLP chunk (model.mlp_chunk_tokens=null under auto): one chunk's fc1/GeLU is 2 GiB at f=8192.
AUTO_MLP_CHUNK_TOKENS = 65536
# The share of a node's physical memory that offloaded layer inputs of its GPUs may pin (the rest is the
# data loaders', the checkpoint writers' and the system's).
HOST_FRACTION = 0.6
# Where a container's memory limit is (cgroup v2, v1): the node's physical memory is not all of it.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")

# What the plan may use of the device: the calibration is on torch's allocated peak, so leave room for
# the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation.
USABLE_FRACTION = 0.90
RESERVED_BYTES = 2 * GIB


@dataclass(frozen=True)
class Recompute:
    """One activation-recomputation setting, in Megatron's TransformerConfig terms, and the two savers
    that go with it.

    granularity: None, "selective" (core attention) or "full"; method "uniform" or "block";
    num_layers: layers per checkpointed group (uniform) or layers recomputed per stage (block);
    mlp_chunk_tokens: the MLP in chunks of this many tokens (LongNetConfig.mlp_chunk_tokens), None: off;
    offload_layers: the saved inputs of this many checkpointed layers in host memory (train/offload.py).
    """

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    mlp_chunk_tokens: int | None = None
    offload_layers: int = 0

    def config_fields(self) -> dict:
        """The TransformerConfig (LongNetConfig) fields of this setting."""
        fields: dict = {"mlp_chunk_tokens": self.mlp_chunk_tokens} if self.mlp_chunk_tokens else {}
        if self.granularity == "selective":
            fields.update(recompute_granularity="selective", recompute_modules=["core_attn"])
        elif self.granularity == "full":
            fields.update(
                recompute_granularity="full",
                recompute_method=self.method,
                recompute_num_layers=self.num_layers,
            )
        return fields

    def recomputed_layers(self, layers_per_block: int) -> int:
        """Whole layers recomputed per model chunk of ``layers_per_block`` layers."""
        if self.granularity != "full":
            return 0
        return min(self.num_layers, layers_per_block) if self.method == "block" else layers_per_block

    def checkpointed_inputs(self, layers_per_block: int) -> int:
        """Layer inputs the checkpoints save per model chunk (uniform: one per group of layers)."""
        if self.granularity == "full" and self.method == "uniform":
            return -(-layers_per_block // self.num_layers)
        return self.recomputed_layers(layers_per_block)

    def __str__(self) -> str:
        if self.granularity is None:
            text = "none"
        elif self.granularity == "selective":
            text = "selective (core attention)"
        elif self.method == "block":
            text = f"block ({self.num_layers} layers)"
        else:
            text = f"full ({self.method}, {self.num_layers} layer{'s' if self.num_layers != 1 else ''})"
        if self.mlp_chunk_tokens:
            text += f" + MLP in {_tokens(self.mlp_chunk_tokens)}-token chunks"
        if self.offload_layers:
            text += f" + {self.offload_layers} layer input{'s' if self.offload_layers != 1 else ''} offloaded"
        return text


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


NONE = Recompute()
SELECTIVE = Recompute("selective")
FULL = Recompute("full", "uniform", 1)


def block(layers: int) -> Recompute:
    """Block recompute of the first ``layers`` layers of each model chunk."""
    return Recompute("full", "block", layers)


@dataclass(frozen=True)
class MemoryInputs:
    """What the footprint depends on: the model's shape, the batch and the parallel layout."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    kv_heads: int
    padded_vocab_size: int  # padded for the tensor-parallel size
    tie_embeddings: bool
    seq_length: int
    patterns: tuple[tuple[int, int], ...]  # dilated (w, r); [(L, 1)]: dense causal attention
    micro_batch_size: int = 1
    num_microbatches: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    precision: str = "bf16"
    fp8: bool = False
    loss_chunk_tokens: int | None = None
    mlp_chunk_tokens: int | None = None  # model.mlp_chunk_tokens: None (the planner's), 0 (off) or a size

    @staticmethod
    def from_job(resolved: ResolvedJob, loss_chunk_tokens: int | None) -> MemoryInputs:
        """The inputs of a resolved job (``loss_chunk_tokens``: the resolved model.loss_chunk_tokens)."""
        job, preset, layout = resolved.config, resolved.preset, resolved.layout
        return MemoryInputs(
            num_layers=preset.num_layers,
            hidden_size=preset.hidden_size,
            ffn_hidden_size=preset.ffn_hidden_size or 4 * preset.hidden_size,
            num_heads=preset.num_attention_heads,
            kv_heads=preset.num_query_groups or preset.num_attention_heads,
            padded_vocab_size=resolved.padded_vocab_size(),
            tie_embeddings=preset.tie_embeddings,
            seq_length=resolved.seq_length,
            patterns=tuple(preset.dilated_attention.patterns),
            micro_batch_size=job.train.micro_batch_size,
            num_microbatches=resolved.num_microbatches,
            tp=layout.tp,
            pp=layout.pp,
            cp=layout.cp,
            vpp=layout.vpp,
            dp=resolved.data_parallel_size,
            sequence_parallel=job.parallel.sequence_parallel,
            distributed_optimizer=job.parallel.use_distributed_optimizer,
            precision=job.train.precision,
            fp8=job.model.fp8 is not None,
            loss_chunk_tokens=loss_chunk_tokens,
            mlp_chunk_tokens=job.model.mlp_chunk_tokens,
        )

    @property
    def layers_per_block(self) -> int:
        """Layers of one model chunk (a pipeline stage, or a virtual stage under interleaving)."""
        return self.num_layers // (self.pp * (self.vpp or 1))

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank (before the sequence-parallel split)."""
        return self.micro_batch_size * self.seq_length // self.cp


@dataclass(frozen=True)
class Footprint:
    """Modelled peak bytes of one rank, in three parts."""

    static: float  # weights, gradient buffers, optimizer state
    activations: float  # saved for backward at the peak
    transient: float  # the loss's or a layer's backward working memory at the peak

    @property
    def total(self) -> float:
        return self.static + self.activations + self.transient


def layer_parameters(x: MemoryInputs) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank (norms are replicated)."""
    h, f, d = x.hidden_size, x.ffn_hidden_size, x.hidden_size // x.num_heads
    qkv = h + 2 * x.kv_heads * d
    split = (h + 1) * qkv + (h + 1) * h + (h + 1) * f + (f + 1) * h  # weights + biases
    return split // x.tp + 4 * h  # two LayerNorms: weight and bias


def static_bytes(x: MemoryInputs, stage: int) -> float:
    """Weights, fp32 gradient buffer and optimizer state of pipeline stage ``stage`` on one rank."""
    h, vocab = x.hidden_size, x.padded_vocab_size // x.tp
    layers = x.num_layers // x.pp * layer_parameters(x)
    embedding = vocab * h if stage == 0 else 0
    if stage == x.pp - 1:
        embedding += 2 * h  # final LayerNorm
        if not x.tie_embeddings or x.pp > 1:  # the output layer (a tied copy on the last stage)
            embedding += vocab * h
    params = layers + embedding
    shards = x.dp * x.cp if x.distributed_optimizer else 1
    if x.precision == "fp32":
        per_param = 4 + 4 + 8 / shards
    else:
        per_param = 2 + 4 + 12 / shards
    fp8_weights = 2 * layers if x.fp8 else 0
    return params * per_param + fp8_weights


def _activation_scale(x: MemoryInputs) -> float:
    return 2.0 if x.precision == "fp32" else 1.0


def layer_activation_bytes(x: MemoryInputs) -> float:
    """Bytes one layer keeps for backward per micro-batch without recomputation."""
    h, f, tp = x.hidden_size, x.ffn_hidden_size, x.tp
    replicated = REPLICATED_H * h / (tp if x.sequence_parallel else 1)
    split = ((LAYER_H - REPLICATED_H) * h + LAYER_FFN * f) / tp
    return x.tokens * _activation_scale(x) * (replicated + split)


def selective_freed_bytes(x: MemoryInputs) -> float:
    """Bytes per layer and micro-batch that recomputing the core attention frees: its fp32 log-sum-exp,
    and its output when mbs > 1 (the output projection then keeps a contiguous copy of its own)."""
    lse = 4.0 * x.num_heads / x.tp
    copy = 2.0 * _activation_scale(x) * x.hidden_size / x.tp if x.micro_batch_size > 1 else 0.0
    return x.tokens * (lse + copy)


def _per_token(x: MemoryInputs, units: float, split_by_sp: bool = True) -> float:
    divisor = x.tp if (x.sequence_parallel and split_by_sp) else 1
    return x.tokens * _activation_scale(x) * units * x.hidden_size / divisor


def loss_workspace_bytes(x: MemoryInputs) -> float:
    """The output layer + loss at the start of backward (last pipeline stage)."""
    vocab = x.padded_vocab_size / x.tp
    if x.loss_chunk_tokens:
        grad_weight = 4.0 * vocab * x.hidden_size  # fp32 accumulator of the output weight's gradient
        return CHUNK_LOSS_BYTES * min(x.loss_chunk_tokens, x.tokens) * vocab + grad_weight
    return PLAIN_LOSS_BYTES * _activation_scale(x) * x.tokens * vocab


def in_flight_microbatches(x: MemoryInputs, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B (interleaved: Megatron's
    penalty on the first stage)."""
    if x.pp == 1:
        return 1.0
    if x.vpp:
        return (
            min(x.num_microbatches * x.vpp, x.pp) * (1 + (x.pp - 1) / (x.pp * x.vpp)) if stage == 0 else 1.0
        )
    return float(min(x.num_microbatches, x.pp - stage))


def mlp_bytes(x: MemoryInputs) -> float:
    """Bytes of one layer's fc1 and GeLU outputs per micro-batch (what the chunked MLP does not keep)."""
    return x.tokens * _activation_scale(x) * LAYER_FFN * x.ffn_hidden_size / x.tp


def mlp_chunks(x: MemoryInputs, recompute: Recompute) -> int:
    """How many chunks :class:`~longnet_megatron.model.chunked_mlp.ChunkedMLP` splits a rank's
    (sequence-parallel: local) sequence into; 1: it runs the MLP unchanged."""
    local = x.tokens // (x.tp if x.sequence_parallel else 1)
    return -(-local // recompute.mlp_chunk_tokens) if recompute.mlp_chunk_tokens else 1


def offloaded_inputs(x: MemoryInputs, recompute: Recompute) -> int:
    """Checkpointed layer inputs per micro-batch moved to host memory."""
    blocks = x.vpp or 1
    return min(recompute.offload_layers, recompute.checkpointed_inputs(x.layers_per_block)) * blocks


def offloaded_bytes(x: MemoryInputs, recompute: Recompute) -> float:
    """Host bytes the offloaded layer inputs take at the end of forward."""
    return offloaded_inputs(x, recompute) * _per_token(x, INPUT_H) * in_flight_microbatches(x, 0)


def footprint(x: MemoryInputs, recompute: Recompute, stage: int = 0) -> Footprint:
    """Modelled peak of pipeline stage ``stage`` with ``recompute``: the larger of the start of backward
    (everything saved, plus the loss's or the first layer's backward working memory) and, with
    recomputation, the rebuild of a recomputed layer (the current micro-batch's kept layers freed).

    The chunked MLP keeps no fc1/GeLU outputs; backward holds one chunk's and the chunks' input
    gradients (``INPUT_H x h``) until they are joined. Offloaded layer inputs leave the saved bytes; the
    last recomputed layer's rebuild is the peak (its own input is back when the others are offloaded).
    """
    per_block, blocks = x.layers_per_block, x.vpp or 1
    full_layer = layer_activation_bytes(x)
    recomputed = recompute.recomputed_layers(per_block) * blocks
    kept = per_block * blocks - recomputed
    kept_layer = full_layer - (selective_freed_bytes(x) if recompute.granularity == "selective" else 0.0)
    rebuilt_layer, chunk_transient = full_layer, 0.0
    chunks = mlp_chunks(x, recompute)
    if chunks > 1:
        chunk_transient = mlp_bytes(x) / chunks + _per_token(x, INPUT_H)
        kept_layer -= mlp_bytes(x)
        rebuilt_layer -= mlp_bytes(x)
    on_gpu = recomputed - offloaded_inputs(x, recompute)
    in_flight = in_flight_microbatches(x, stage)

    def saved(inputs: int) -> float:
        return in_flight * (kept * kept_layer + inputs * _per_token(x, INPUT_H) + _per_token(x, OUTSIDE_H))

    backward = _per_token(x, BACKWARD_H, split_by_sp=False) / x.tp + chunk_transient
    loss = loss_workspace_bytes(x) if stage == x.pp - 1 else 0.0
    static = static_bytes(x, stage)
    at_start = Footprint(static, saved(on_gpu), max(loss, backward))
    if not recomputed:
        return at_start
    rebuilding = Footprint(static, saved(max(on_gpu, 1)) - kept * kept_layer, rebuilt_layer + backward)
    return max(at_start, rebuilding, key=lambda fp: fp.total)


def peak_footprint(x: MemoryInputs, recompute: Recompute) -> Footprint:
    """The larger of the first and the last pipeline stage's footprints."""
    stages = {0, x.pp - 1}
    return max((footprint(x, recompute, s) for s in stages), key=lambda fp: fp.total)


def recompute_flops(x: MemoryInputs, recompute: Recompute) -> float:
    """Forward FLOPs recomputed per micro-batch on a rank (what the candidates are ordered by)."""
    h, f, d = x.hidden_size, x.ffn_hidden_size, x.hidden_size // x.num_heads
    per_token = 2 * h * (x.num_heads + 2 * x.kv_heads) * d + 2 * x.num_heads * d * h + 4 * h * f
    pairs = attention_pairs(x.seq_length, x.num_heads, x.patterns) / x.cp
    attention = x.micro_batch_size * 4 * d * pairs / x.tp
    layer = x.tokens * per_token / x.tp + attention
    blocks = x.vpp or 1
    mlp = x.tokens * 4 * h * f / x.tp if mlp_chunks(x, recompute) > 1 else 0.0  # once more per layer
    if recompute.granularity == "selective":
        return x.layers_per_block * blocks * (attention + mlp)
    return (
        recompute.recomputed_layers(x.layers_per_block) * blocks * layer + x.layers_per_block * blocks * mlp
    )


def candidates(x: MemoryInputs) -> list[Recompute]:
    """Every setting the planner considers, cheapest recomputation first (then fewest offloaded inputs).

    ``x.mlp_chunk_tokens`` (model.mlp_chunk_tokens): a size, every candidate chunks the MLP; None, full
    recompute is also tried with the MLP in ``AUTO_MLP_CHUNK_TOKENS`` chunks (not under FP8); 0: never.
    Then the largest of those with the first 1, 2, ... layer inputs offloaded (one pipeline stage only;
    not under FP8, whose TE checkpoint is not verified to save its inputs where the offloader sees them).
    """
    fixed = x.mlp_chunk_tokens or None
    options = [NONE, SELECTIVE, *(block(k) for k in range(1, x.layers_per_block)), FULL]
    options = [dataclasses.replace(r, mlp_chunk_tokens=fixed) for r in options]
    last = options[-1]
    if x.mlp_chunk_tokens is None and not x.fp8:
        chunked = dataclasses.replace(FULL, mlp_chunk_tokens=AUTO_MLP_CHUNK_TOKENS)
        if mlp_chunks(x, chunked) > 1:
            options.append(chunked)
            last = chunked
    if x.pp == 1 and not x.fp8:
        inputs = last.checkpointed_inputs(x.layers_per_block)
        options += [dataclasses.replace(last, offload_layers=k) for k in range(1, inputs + 1)]
    return sorted(options, key=lambda r: (recompute_flops(x, r), r.offload_layers))


@dataclass(frozen=True)
class MemoryPlan:
    """The planner's choice and the numbers behind it."""

    recompute: Recompute
    footprint: Footprint | None  # None on CPU (nothing planned)
    usable_bytes: float | None
    device_bytes: float | None
    none_bytes: float | None = None  # modelled peak without recomputation
    offloaded_bytes: float = 0.0  # host memory the offloaded layer inputs take
    host_bytes: float | None = None  # what they may take (None: unchecked)

    @property
    def fits(self) -> bool:
        if self.footprint is None:
            return True
        host_ok = self.host_bytes is None or self.offloaded_bytes <= self.host_bytes
        return self.footprint.total <= self.usable_bytes and host_ok

    def describe(self) -> str:
        """One line for the log."""
        if self.footprint is None:
            return f"recompute {self.recompute} (no GPU: nothing to plan for)"
        fp = self.footprint
        host = f" ({self.offloaded_bytes / GIB:.1f} GiB host)" if self.offloaded_bytes else ""
        text = (
            f"recompute {self.recompute}{host}: modelled peak {fp.total / GIB:.1f} GiB of "
            f"{self.usable_bytes / GIB:.1f} GiB usable ({self.device_bytes / GIB:.1f} GiB device) = "
            f"weights+grads+optimizer {fp.static / GIB:.1f} + activations {fp.activations / GIB:.1f} + "
            f"transient {fp.transient / GIB:.1f}"
        )
        if self.recompute != NONE and self.none_bytes is not None:
            text += f"; without recomputation {self.none_bytes / GIB:.1f} GiB"
        if not self.fits:
            over = max(fp.total - self.usable_bytes, 0.0)
            text += f"; DOES NOT FIT even so (GPU over by {over / GIB:.1f} GiB"
            if self.host_bytes is not None:
                text += f"; host budget for offloaded layer inputs {self.host_bytes / GIB:.1f} GiB"
            text += (
                "): expect out-of-memory; split the sequence (parallel.context_parallel_size) or the model"
            )
        return text


def usable_bytes(device_bytes: float) -> float:
    """What the plan may fill of a device of ``device_bytes``."""
    return device_bytes * USABLE_FRACTION - RESERVED_BYTES


def host_memory_bytes(fraction: float = HOST_FRACTION) -> float:
    """This rank's share of the node's memory for offloaded layer inputs: ``fraction`` of the physical
    memory (or of the container's limit, when lower) divided over the node's ranks (LOCAL_WORLD_SIZE,
    else the visible GPUs)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = min(memory, int(limit))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or torch.cuda.device_count() or 1
    return fraction * memory / local


def make_plan(
    x: MemoryInputs,
    recompute: Recompute,
    device_bytes: float,
    host_bytes: float | None,
    none: float | None = None,
) -> MemoryPlan:
    """The plan of one setting: its modelled footprint against the device and the host budget."""
    return MemoryPlan(
        recompute,
        peak_footprint(x, recompute),
        usable_bytes(device_bytes),
        device_bytes,
        none,
        offloaded_bytes(x, recompute),
        host_bytes,
    )


def plan_recompute(x: MemoryInputs, device_bytes: float, host_bytes: float | None = None) -> MemoryPlan:
    """The cheapest setting whose modelled peak fits ``usable_bytes(device_bytes)`` and whose offloaded
    layer inputs fit ``host_bytes`` (None: no host limit); when none does, the smallest footprint within
    the host budget (its plan says it does not fit)."""
    none = peak_footprint(x, NONE).total
    plans = [make_plan(x, option, device_bytes, host_bytes, none) for option in candidates(x)]
    for plan in plans:
        if plan.fits:
            return plan
    within_host = [p for p in plans if host_bytes is None or p.offloaded_bytes <= host_bytes]
    return min(within_host, key=lambda p: p.footprint.total)


def device_memory_bytes(device: torch.device) -> float | None:
    """The smallest total memory of the job's GPUs (every rank must choose the same recomputation:
    tensor-parallel ranks recompute collectives together); None on CPU. Collective."""
    if device.type != "cuda":
        return None
    total = torch.tensor([float(torch.cuda.get_device_properties(device).total_memory)], device=device)
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return float(total.item())


def explicit_recompute(resolved: ResolvedJob) -> Recompute:
    """``model.recompute`` (with ``model.mlp_chunk_tokens`` and ``model.offload_layer_inputs``) when it
    is not auto; under auto only a given MLP chunk size."""
    m = resolved.config.model
    chunk = m.mlp_chunk_tokens or None
    if m.recompute == "selective":
        return dataclasses.replace(SELECTIVE, mlp_chunk_tokens=chunk)
    if m.recompute == "full":
        return Recompute("full", m.recompute_method, m.recompute_num_layers, chunk, m.offload_layer_inputs)
    return Recompute(mlp_chunk_tokens=chunk)


def plan_for_job(
    resolved: ResolvedJob,
    loss_chunk_tokens: int | None,
    device_bytes: float | None,
    host_bytes: float | None = None,
) -> MemoryPlan:
    """The job's plan: ``model.recompute`` as given, or (auto) planned for ``device_bytes`` (None: CPU,
    where auto means none) and ``host_bytes`` of host memory for offloaded layer inputs (None: no
    limit). An explicit setting is still modelled, so the log shows its footprint."""
    x = MemoryInputs.from_job(resolved, loss_chunk_tokens)
    auto = resolved.config.model.recompute == "auto"
    if device_bytes is None:
        return MemoryPlan(explicit_recompute(resolved), None, None, None)
    if auto:
        return plan_recompute(x, device_bytes, host_bytes)
    return make_plan(x, explicit_recompute(resolved), device_bytes, host_bytes)
