"""Functions the training tests run inside gloo ranks (module level so that spawn can pickle them).

Most runs keep checkpointing off to stay fast (resume is tested through real launches in
test_resume.py and test_launch.py); the falling run saves once, for the init_from check.
"""

from __future__ import annotations

import os

import torch

from longnet_megatron.train.config import load_config
from longnet_megatron.train.distributed import world_from_env
from longnet_megatron.train.job import resolve_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


def base_overrides(prefix: str, run_dir: str, steps: int) -> list[str]:
    return [
        f"data.prefixes=[{prefix}]",
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
        "logging.interval=1000",
        "logging.tensorboard=false",
        "train.exit_signal_handling=false",
    ]


def _full_state(models: list[torch.nn.Module], out: dict) -> None:
    from longnet_megatron.model.state_dict import tensors_only

    (model,) = models
    out["state"] = {k: v.detach().clone() for k, v in tensors_only(model.state_dict()).items()}


def _load_full_state(full: dict[str, torch.Tensor], models: list[torch.nn.Module]) -> None:
    """Load unsharded single-rank weights into this rank's tensor shard / pipeline stage(s)."""
    from megatron.core import parallel_state as ps

    from longnet_megatron.model.state_dict import select_pipeline_stage, shard_for_tensor_parallel

    full = dict(full)
    full.setdefault("output_layer.weight", full["embedding.word_embeddings.weight"])  # tied, last stage
    shard = shard_for_tensor_parallel(
        full, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    )
    for model in models:
        model.load_state_dict(select_pipeline_stage(shard, model), strict=True)


def train(overrides: list[str], init_weights=None) -> list[float]:
    from longnet_megatron.train.trainer import Trainer

    trainer = Trainer(
        resolve_job(load_config(TINY, overrides), world_from_env().world_size), init_weights=init_weights
    )
    trainer.train()
    trainer.close()
    return [r["loss"] for r in trainer.history]


def single_process_worker(prefix: str, run_dir: str, layout_overrides: list[str], steps: int) -> dict:
    """The 1-process reference losses and initial weights, plus a longer run whose loss must fall."""
    captured: dict = {}
    reference = train(
        base_overrides(prefix, run_dir + "/ref", steps) + layout_overrides,
        init_weights=lambda models: _full_state(models, captured),
    )
    # The falling run also saves its weights; a fresh 1-step run initialised from them (weights only)
    # must start near the trained loss. The vocabulary is fixed so TP=2 can load the same tensors.
    falling = train(
        base_overrides(prefix, run_dir + "/falls", 30)
        + ["optim.warmup_steps=5", "optim.lr=3e-3", "model.vocab_size=384", "checkpoint.save_at_end=true"]
    )
    initialised = init_from_run(prefix, run_dir + "/init_tp1", run_dir + "/falls", [])
    return {"reference": reference, "state": captured["state"], "falling": falling, "init": initialised}


def init_from_run(prefix: str, run_dir: str, source: str, layout: list[str]) -> list[float]:
    """One step of a fresh run whose weights come from ``source`` (checkpoint.init_from)."""
    return train(
        base_overrides(prefix, run_dir, 1)
        + ["optim.warmup_steps=0", "model.vocab_size=384", f"checkpoint.init_from={source}", *layout]
    )


def layouts_worker(
    prefix: str,
    run_dir: str,
    layout_overrides: list[str],
    steps: int,
    layouts: dict[str, list[str]],
    full_state: dict,
) -> dict[str, list[float]]:
    """Each named layout's losses from the same initial weights (one group, layouts in turn)."""
    out = {}
    for name, layout in layouts.items():
        out[name] = train(
            base_overrides(prefix, f"{run_dir}/{name}", steps) + layout_overrides + layout,
            init_weights=lambda models: _load_full_state(full_state, models),
        )
    return out


def blend_worker(prefix: str, cache_dir: str) -> dict:
    """Two prefixes blended 3:1 through BlendedMegatronDatasetBuilder (it needs a process group)."""
    from longnet_megatron.train import data as data_lib

    job = load_config(
        TINY, [f"data.prefixes=[{prefix},{prefix}]", "data.weights=[3,1]", f"data.cache_dir={cache_dir}"]
    )
    train, valid = data_lib.build_datasets(resolve_job(job, 1), num_train_samples=40, num_valid_samples=4)
    return {"train_len": len(train), "valid": valid is not None, "sample": train[0]}


def documents_worker(prefix: str, cache_dir: str) -> dict:
    """Masked samples of a packed dataset vs its boundaries sidecar (GPTDataset needs a process group)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.megatron_config import packed_sequence_index
    from data_prep.pack import boundaries_prefix, split_prefix
    from longnet_megatron.train import data as data_lib

    job = load_config(
        TINY,
        [f"data.prefixes=[{prefix}]", f"data.cache_dir={cache_dir}", "data.document_masking=true",
         "data.reset_position_ids=true"],
    )  # fmt: skip
    train, _ = data_lib.build_datasets(resolve_job(job, 1), num_train_samples=40, num_valid_samples=4)
    bounds = IndexedDataset(boundaries_prefix(split_prefix(prefix, "train")))
    mismatch, boundaries = [], 0
    for i in range(len(train)):
        sample = train[i]
        starts = [s for s in bounds[packed_sequence_index(train.dataset, i)].tolist() if s < 128]
        ids = sample["document_ids"]
        from_ids = [0] + ((ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1).tolist()
        restarts = [0] + ((sample["position_ids"][1:] == 0).nonzero().squeeze(1) + 1).tolist()
        boundaries += len(from_ids) - 1
        if not (from_ids == starts == restarts):
            mismatch.append((i, from_ids, starts, restarts))
    return {"checked": len(train), "mismatch": mismatch, "boundaries": boundaries}
