"""Functions the export tests run inside gloo ranks (module level, so spawn can pickle them).

Two groups cover everything that needs Megatron, because starting ranks that import it costs seconds:

* :func:`saving_worker` (2 ranks): saves a TP=2 checkpoint and a PP=2 checkpoint with their
  Megatron logits, reshards the TP=2 checkpoint to PP=2 and trains both for a few steps;
* :func:`conversion_worker` (1 rank): exports them to HF folders (also from the description the
  trainer writes), the round trip back to Megatron, the bad-checkpoint errors (through the CLI too).

Workers return plain tensors, dicts and strings; the assertions live in the tests.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.pipeline_parallel import get_forward_backward_func

from longnet_megatron.checkpoint import CheckpointError, find_checkpoint
from longnet_megatron.checkpoint.record import model_record, read_record
from longnet_megatron.checkpoint.weights import (
    build_models,
    load_full_model,
    load_weights,
    padded_vocab_size,
    save_weights,
)
from longnet_megatron.model import build_longnet_gpt, get_preset, make_longnet_config
from longnet_megatron.testing import ParallelLayout, initialize_megatron_parallel

SEQ = 192  # partial last segments for the tiny patterns (64, 128, 256)
BATCH = 2
TOKENIZER = {"kind": "bytes"}  # 257 ids: padded to 320 at TP=1, 384 at TP=2 (divisible by 64 * tp)
# GQA (2 kv groups for 4 heads) so the per-group QKV layout is exercised; PP needs 2+ layers a stage.
PRESETS = {
    "tp2": get_preset("tiny").replace(num_query_groups=2, vocab_size=257),
    "pp2": get_preset("tiny").replace(num_query_groups=2, vocab_size=257, num_layers=4),
}
TRAIN_STEPS = 2


def tokens(seed: int, batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (inputs, labels) from the tokenizer's real ids."""
    data = torch.randint(0, 257, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def randomize(model: torch.nn.Module) -> None:
    """Give every weight, bias and norm distinct values (fresh biases are 0 and norms 1, which would
    hide a swapped mapping). Replicated parameters get the same values on every TP rank."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    offset = model.decoder.layers[0].layer_number - 1
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers."):  # global layer index, whatever the stage
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + offset)
                name = ".".join(parts)
            sharded = getattr(param, "tensor_model_parallel", False)
            seed = zlib.crc32(name.encode()) + (1000 * tp_rank if sharded else 0)
            gen = torch.Generator().manual_seed(seed)
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
        # Tied embeddings under PP: the last stage's output layer is a copy of the first stage's
        # embedding; make it one again, as Megatron does at initialisation (zero it, sum over both).
        if (
            parallel_state.get_pipeline_model_parallel_world_size() > 1
            and model.share_embeddings_and_output_weights
        ):
            weight = model.shared_embedding_or_output_weight()
            if not parallel_state.is_pipeline_first_stage():
                weight.zero_()
            dist.all_reduce(weight, group=parallel_state.get_embedding_group())


def _loss(labels: torch.Tensor):
    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    return loss_func


def schedule(models: list[torch.nn.Module], batches: list, forward_only: bool) -> tuple[list, list]:
    """One pass of Megatron's schedule over ``batches``: (per-micro-batch losses, logits) on the last stage."""
    logits: list[torch.Tensor] = []

    def forward_step(iterator, model):
        inputs, labels = next(iterator)
        position = torch.arange(inputs.shape[1]).expand_as(inputs)
        if forward_only:
            out = model(inputs, position, None)
            if out is not None and parallel_state.is_pipeline_last_stage():
                logits.append(out.detach())
            return out, lambda o: (o.float().sum() * 0, {"loss": torch.zeros(())})
        return model(inputs, position, None, labels=labels), _loss(labels)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=models[0],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0][0].shape[0],
        forward_only=forward_only,
    )
    return [x["loss"] for x in losses], logits


def train(models: list[torch.nn.Module]) -> list[float]:
    """A few Adam steps through Megatron's schedule; the mean loss of each step (last stage)."""
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    history = []
    for step in range(TRAIN_STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses, _ = schedule(models, [tokens(100 + step, batch=1), tokens(200 + step, batch=1)], False)
        # Tied embeddings under PP: the first stage's embedding and the last stage's output layer are
        # one weight; Megatron's finalize_model_grads adds their gradients the same way.
        if (
            parallel_state.get_pipeline_model_parallel_world_size() > 1
            and models[0].share_embeddings_and_output_weights
        ):
            weight = models[0].shared_embedding_or_output_weight()
            dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
        optimizer.step()
        history.append(float(torch.stack(losses).mean()) if losses else None)
    return history


def save_case(name: str, root: Path) -> dict:
    """Build the case's model in the current layout with distinct weights, take its logits, save it."""
    preset = PRESETS[name]
    config = make_longnet_config(preset)
    model = build_longnet_gpt(
        preset,
        config=config,
        use_te=False,
        parallel_output=False,  # full-vocabulary logits on every TP rank
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    randomize(model)
    _, logits = schedule([model], [tokens(0)], forward_only=True)
    save_weights([model], root / name / "checkpoints", model_record(preset, config, TOKENIZER), step=7)
    return {"logits": logits[0] if logits else None}


def saving_worker(root: str) -> dict:
    """Rank r's view: saved checkpoints and logits for TP=2 and PP=2; training losses from the TP=2
    checkpoint in its own layout and from its PP=2 reshard."""
    root = Path(root)
    out: dict = {}

    initialize_megatron_parallel(ParallelLayout(tp=2))
    out["tp2"] = save_case("tp2", root)
    ckpt = find_checkpoint(root / "tp2")
    record = read_record(ckpt)
    models = build_models(record, padded_vocab_size(ckpt))
    load_weights(models, ckpt)
    out["tp2"]["train"] = train(models)
    out["tp2"]["padded_vocab"] = models[0].embedding.word_embeddings.weight.shape[0] * 2

    initialize_megatron_parallel(ParallelLayout(pp=2))
    out["pp2"] = save_case("pp2", root)
    from longnet_megatron.export.reshard import reshard_here

    resharded = reshard_here(find_checkpoint(root / "tp2"), root / "tp2_as_pp2", 7)
    models = build_models(read_record(resharded), padded_vocab_size(resharded))
    load_weights(models, resharded)
    out["resharded"] = {"path": str(resharded), "train": train(models)}
    out["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


# ----------------------------------------------------------------------------- conversion (1 rank)


def _full_state(path: Path) -> dict[str, torch.Tensor]:
    from longnet_megatron.model.state_dict import tensors_only

    model, _ = load_full_model(find_checkpoint(path))
    return {k: v.clone() for k, v in tensors_only(model.state_dict()).items()}


def _damaged_copies(root: Path) -> dict[str, Path]:
    """Broken variants of the TP=2 checkpoint, one failure each."""
    source = find_checkpoint(root / "tp2")
    bad = root / "bad"
    cases = {}

    def copy(name: str) -> Path:
        target = bad / name / source.name
        shutil.copytree(source, target)
        (bad / name / "latest").write_text(source.name + "\n")
        cases[name] = bad / name
        return target

    shard = sorted(p.name for p in source.glob("*.distcp"))[0]
    (copy("missing_shard") / shard).unlink()
    with open(copy("short_shard") / shard, "r+b") as f:
        f.truncate(100)
    if (source / "common.pt").exists():  # megatron-core 0.19+ keeps the common state in the shards
        (copy("no_common") / "common.pt").unlink()
    (copy("no_metadata") / "metadata.json").unlink()
    meta_path = copy("wrong_architecture") / "longnet.json"
    meta = json.loads(meta_path.read_text())
    meta["longnet_model"]["preset"]["hidden_size"] = 128
    meta_path.write_text(json.dumps(meta))
    foreign = bad / "foreign_dist_checkpoint"
    foreign.mkdir(parents=True)
    dist_checkpointing.save(
        {"w": ShardedTensor.from_rank_offsets("encoder.weight", torch.ones(3))}, str(foreign)
    )
    cases["foreign_dist_checkpoint"] = foreign
    (bad / "dangling_latest").mkdir(parents=True)
    (bad / "dangling_latest" / "latest").write_text("iter_0000099\n")
    cases["dangling_latest"] = bad / "dangling_latest"
    (bad / "not_a_checkpoint").mkdir()
    (bad / "not_a_checkpoint" / "weights.pt").write_bytes(b"\0" * 16)
    cases["not_a_checkpoint"] = bad / "not_a_checkpoint"
    cases["does_not_exist"] = bad / "does_not_exist"
    return cases


def trainer_style_copy(root: Path) -> Path:
    """The TP=2 checkpoint with the description ``longnet_megatron.train`` writes (``longnet.json``
    without a model record: preset name, architecture, patterns, tokenizer, parallel sizes)."""
    source = find_checkpoint(root / "tp2")
    target = root / "trainer_style" / "checkpoints"
    shutil.copytree(source, target / source.name)
    (target / "latest").write_text(source.name + "\n")
    preset, config = PRESETS["tp2"], make_longnet_config(PRESETS["tp2"])
    meta = {
        "step": 7,
        "format": "megatron.core.dist_checkpointing",
        "tokenizer": TOKENIZER,
        "model": {
            "preset": "tiny",
            "num_layers": preset.num_layers,
            "hidden_size": preset.hidden_size,
            "num_attention_heads": preset.num_attention_heads,
            "num_query_groups": preset.num_query_groups,
            "ffn_hidden_size": preset.ffn_hidden_size,
            "segment_lengths": list(preset.dilated_attention.segment_lengths),
            "dilation_rates": list(preset.dilated_attention.dilation_rates),
            "seq_length": preset.seq_length,
            "vocab_size": preset.vocab_size,
            "padded_vocab_size": preset.padded_vocab_size(2),
            "tie_embeddings": preset.tie_embeddings,
            "rotary_base": preset.rotary_base,
            "dilated_attention": config.dilated_patterns_dict(),
        },
        "parallel": {"tensor": 2, "pipeline": 1, "virtual_pipeline": None, "context": 1, "data": 1},
    }
    (target / source.name / "longnet.json").write_text(json.dumps(meta))
    return root / "trainer_style"


def conversion_worker(root: str) -> dict:
    """Exports, round trip and error cases on one rank (TP=PP=1)."""
    from click.testing import CliRunner

    from longnet_megatron.export.cli import main as cli
    from longnet_megatron.export.megatron_to_hf import export_to_hf

    root = Path(root)
    out: dict = {}
    export_to_hf(root / "tp2", root / "hf_tp2")
    # PP=2 through the CLI, with shards small enough to split the 4-layer model.
    result = CliRunner().invoke(
        cli, ["to-hf", str(root / "pp2"), str(root / "hf_pp2"), "--max-shard-size", "200KB"]
    )
    out["cli_to_hf"] = {
        "exit_code": result.exit_code,
        "output": result.output,
        "error": repr(result.exception),
    }
    export_to_hf(root / "tp2_as_pp2", root / "hf_resharded")

    export_to_hf(trainer_style_copy(root), root / "hf_trainer_style")

    result = CliRunner().invoke(
        cli, ["from-hf", str(root / "hf_tp2"), str(root / "back"), "--iteration", "7"]
    )
    out["cli_from_hf"] = {
        "exit_code": result.exit_code,
        "output": result.output,
        "error": repr(result.exception),
    }
    original, back = _full_state(root / "tp2"), _full_state(root / "back")
    out["round_trip"] = {
        "names": (sorted(original), sorted(back)),
        "unequal": sorted(k for k in original if k in back and not torch.equal(original[k], back[k])),
    }

    errors = {}
    for name, path in _damaged_copies(root).items():
        try:
            export_to_hf(path, root / "bad_out" / name)
            errors[name] = ("no error", "")
        except CheckpointError as e:
            errors[name] = (e.kind, str(e))
    out["errors"] = errors
    result = CliRunner().invoke(
        cli, ["to-hf", str(root / "bad" / "missing_shard"), str(root / "bad_out" / "cli")]
    )
    out["cli_error"] = {"exit_code": result.exit_code, "output": result.output}
    return out
