"""The Trainer: LongNet pretraining on Megatron-Core, top to bottom.

    trainer = Trainer(resolve_job(load_config("configs/tiny_cpu.yaml"), world_size=1))
    exit_code = trainer.train()      # 0, or REQUEUE_EXIT_CODE after a signal-triggered checkpoint

Construction sets up, in order: process groups and parallel_state, seeds, the model (this rank's
pipeline chunks in Megatron DDP), the optimizer and lr scheduler, the checkpoint (resumed from
``latest`` when there is one), the data from the resumed position, and the metrics writers.
``train()`` then runs steps: one global batch through ``get_forward_backward_func`` (micro-batches,
1F1B under pipeline parallelism), the optimizer step, logging, validation, checkpoints, signals.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from longnet_megatron.checkpoint.files import find_checkpoint, write_atomic
from longnet_megatron.checkpoint.record import model_record
from longnet_megatron.checkpoint.training_state import TrainingCheckpointer
from longnet_megatron.checkpoint.verify import resume_checkpoint
from longnet_megatron.checkpoint.weights import load_weights, open_checkpoint
from longnet_megatron.train import data as data_lib
from longnet_megatron.train.config import dump_config
from longnet_megatron.train.distributed import World, init_distributed, world_from_env
from longnet_megatron.train.fp8 import check_fp8_device
from longnet_megatron.train.job import ResolvedJob
from longnet_megatron.train.memory_plan import device_memory_bytes, host_memory_bytes, plan_for_job
from longnet_megatron.train.metrics import MetricsWriter, memory_gib, peak_tflops, preset_training_flops
from longnet_megatron.train.model import (
    build_model_chunks,
    loss_chunk_tokens,
    transformer_config,
    unwrap,
    uses_transformer_engine,
)
from longnet_megatron.train.offload import layer_input_offloader
from longnet_megatron.train.optim import build_optimizer, build_scheduler
from longnet_megatron.train.position_loss import PositionEvaluator, packed_split_for
from longnet_megatron.train.signals import REQUEUE_EXIT_CODE, ExitSignals

log = logging.getLogger("longnet_megatron.train")


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token loss, token count, and [sum, count] to report (Megatron-LM's per-token loss)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


class Trainer:
    """One training run of a resolved job (:func:`~longnet_megatron.train.job.resolve_job`) on this rank.

    init_weights: optional callable given this rank's (unwrapped) model chunks after they are built and
        before the optimizer sees them, e.g. to load the same full weights under several layouts.
    layer_spec, config_overrides: another transformer layer spec than LongNet's and further
        TransformerConfig fields (tools/bench_train.py's dense baseline: Megatron's TE spec with cuDNN
        attention); the FLOPs in the metrics still count the dilated patterns.
    """

    def __init__(
        self,
        resolved: ResolvedJob,
        world: World | None = None,
        init_weights: Callable[[list[torch.nn.Module]], None] | None = None,
        layer_spec: Any = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.resolved = resolved
        self.job = job = resolved.config
        world = world or world_from_env()
        if world.world_size != resolved.world_size:
            raise ValueError(
                f"the job was resolved for {resolved.world_size} ranks, this world has {world.world_size}"
            )
        # Before anything starts: every thread and process started from here on inherits them blocked.
        self.signals = ExitSignals().install() if job.train.exit_signal_handling else None
        check_fp8_device(job.model)
        self.device = init_distributed(job, world)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_logging_rank = self.rank == 0
        _setup_logging(self.is_logging_rank)
        self._seed(job.train.seed + 100 * ps.get_pipeline_model_parallel_rank())

        # Model: this rank's pipeline chunks, DDP-wrapped; its record goes into every checkpoint.
        self.preset, self.seq_length = resolved.preset, resolved.seq_length
        device_bytes = device_memory_bytes(self.device)
        host_bytes = host_memory_bytes() if device_bytes is not None else None
        self.memory_plan = plan_for_job(resolved, loss_chunk_tokens(resolved), device_bytes, host_bytes)
        (log.info if self.memory_plan.fits else log.warning)("memory plan: %s", self.memory_plan.describe())
        self.model_config = transformer_config(resolved, config_overrides, self.memory_plan.recompute)
        self.chunks = build_model_chunks(resolved, self.model_config, self.device, layer_spec)
        # The plan's offloaded layer inputs (one pipeline stage, so one model chunk): around its forward.
        offload = self.memory_plan.recompute.offload_layers
        self.offloader = layer_input_offloader(unwrap(self.chunks)[0], offload) if offload else None
        self.record = model_record(self.preset, self.model_config, resolved.tokenizer)
        if init_weights is not None:
            init_weights(unwrap(self.chunks))
            for chunk in self.chunks:
                chunk.broadcast_params()  # keep data-parallel replicas identical

        # Optimizer and schedule; Megatron's schedules find the gradient hooks through the config.
        self.optimizer = build_optimizer(job, self.chunks)
        self.scheduler = build_scheduler(job, self.optimizer)
        self.model_config.finalize_model_grads_func = finalize_model_grads
        self.model_config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.chunks]
        self.model_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if job.parallel.overlap_grad_reduce:
            sync = [chunk.start_grad_sync for chunk in self.chunks]
            self.model_config.grad_sync_func = sync[0] if len(sync) == 1 else sync
        if job.parallel.overlap_param_gather:
            sync = [chunk.start_param_sync for chunk in self.chunks]
            self.model_config.param_sync_func = sync[0] if len(sync) == 1 else sync

        # Batch geometry.
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.num_microbatches = resolved.num_microbatches
        self.global_batch = job.train.global_batch_size

        # Checkpoint: resume from `latest` (or an explicit checkpoint.load).
        self.step, self.consumed_samples = 0, 0
        self.checkpointer = TrainingCheckpointer(
            job.checkpoint_dir,
            job.checkpoint.keep_last,
            job.checkpoint.optimizer_sharding,
            async_save=job.checkpoint.async_save,
        )
        resume = self._resume_point()
        if resume:
            state = self.checkpointer.load(resume, self.chunks, self.optimizer, self.scheduler, self.record)
            self.step, self.consumed_samples = int(state["step"]), int(state["consumed_samples"])
            log.info(
                "resumed from %s at step %d (%d samples consumed)", resume, self.step, self.consumed_samples
            )
        elif job.checkpoint.init_from:
            self._init_weights_from(job.checkpoint.init_from)

        # Data from the resumed position; validation always reads the same first eval_iters batches.
        t = job.train
        num_valid = t.eval_iters * self.global_batch if t.eval_interval else 0
        self.train_data, self.valid_data = data_lib.build_datasets(
            resolved, t.steps * self.global_batch, num_valid
        )
        self.train_iters = self._iterators(self.train_data, self.consumed_samples)
        self.position_eval = self._position_evaluator()

        # Metrics.
        self.flops_per_step = self.global_batch * preset_training_flops(
            self.preset, vocab_size=resolved.padded_vocab_size()
        )
        self.peak_tflops = peak_tflops(job.logging.peak_tflops)
        self.metrics = MetricsWriter(
            job.run_dir, job.logging.tensorboard, self.is_logging_rank, resume_step=self.step
        )
        self.history: list[dict[str, Any]] = []  # every step's record, on every rank (tests read it)
        self._write_run_files()
        self._log_setup()

    # ------------------------------------------------------------------ setup helpers

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def _iterators(self, dataset, consumed: int) -> list:
        """One iterator per model chunk (interleaved schedules read each chunk's own)."""
        return [
            data_lib.micro_batches(
                dataset,
                consumed,
                self.job.train.micro_batch_size,
                self.dp_rank,
                self.dp_size,
                self.job.data.num_workers,
            )
            for _ in self.chunks
        ]

    def _position_evaluator(self) -> PositionEvaluator | None:
        """The ``eval`` section's evaluator (None when ``eval.interval`` is 0)."""
        e = self.job.eval
        if not e.interval:
            return None
        prefix = e.prefix or self.job.data.prefixes[0]
        data = packed_split_for(prefix, e.split, self.seq_length, self.resolved.tokenizer)
        return PositionEvaluator(data, e.sequences, self.seq_length)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from: ``checkpoint.load``, else the newest complete one of the
        checkpoint directory (``latest`` unless it is broken: :func:`resume_checkpoint`), decided on
        rank 0 and shared, so every rank loads the same one."""
        ckpt = self.job.checkpoint
        choice: list[Any] = [None]
        if self.rank == 0:
            if ckpt.load:
                choice[0] = str(find_checkpoint(ckpt.load))
            elif ckpt.resume:
                found = resume_checkpoint(self.job.checkpoint_dir)
                choice[0] = str(found) if found else None
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def run_metadata(self) -> dict[str, Any]:
        """The run directory's ``run.json``: the model record and the resolved job."""
        return {"longnet_model": self.record, "job": self.job.to_dict(), "world_size": self.world_size}

    def _write_run_files(self) -> None:
        if not self.is_logging_rank:
            return
        os.makedirs(self.job.run_dir, exist_ok=True)
        dump_config(self.job, os.path.join(self.job.run_dir, "config.yaml"))
        write_atomic(
            os.path.join(self.job.run_dir, "run.json"), json.dumps(self.run_metadata(), indent=2) + "\n"
        )

    def _log_setup(self) -> None:
        p, t = self.job.parallel, self.job.train
        params = sum(p_.numel() for c in self.chunks for p_ in c.parameters())
        chunk = self.model_config.loss_chunk_tokens
        log.info(
            "LongNet %s: L=%d, vocab %d, %s params on rank 0 | world %d = tp %d x pp %d x cp %d x dp %d | "
            "global batch %d = micro %d x %d micro-batches x dp %d | %s on %s | layers %s, attention %s | "
            "loss %s | run dir %s",
            self.job.model.preset,
            self.seq_length,
            self.preset.vocab_size,
            f"{params:,}",
            self.world_size,
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.context_parallel_size,
            self.dp_size,
            self.global_batch,
            t.micro_batch_size,
            self.num_microbatches,
            self.dp_size,
            t.precision,
            self.device.type,
            "Transformer Engine" if uses_transformer_engine(self.resolved) else "Megatron local",
            self.job.model.attention_backend,
            f"in chunks of {chunk} tokens" if chunk else "plain",
            self.job.run_dir,
        )
        if self.job.data.synthetic:
            log.warning("data: SYNTHETIC random tokens: the loss cannot fall; for throughput only")

    # ------------------------------------------------------------------ one step

    def _forward_step(self, data_iterator, model):
        batch = data_lib.split_for_context_parallel(next(data_iterator), self.cp_rank, self.cp_size)
        batch = data_lib.to_device(batch, self.device)
        with self.offloader or nullcontext():
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                           packed_seq_params=data_lib.packed_seq_params(batch, self.job.data, self.seq_length))  # fmt: skip
        return output, partial(_loss_func, batch["loss_mask"])

    def _forward_backward(self, iterators: list, forward_only: bool) -> tuple[float, float]:
        """One global batch through Megatron's schedule; (summed token loss, token count) of all replicas."""
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.job.train.micro_batch_size,
            forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            for report in reports:
                total += report["lm loss"].to(total)
        dist.all_reduce(total)  # over data- and context-parallel replicas; zeros elsewhere
        return total[0].item(), total[1].item()

    def train_step(self) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum, tokens = self._forward_backward(self.train_iters, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        return {
            "loss": loss_sum / max(tokens, 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped": 0 if updated else 1,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean token loss over the first ``train.eval_iters`` validation batches, and its perplexity."""
        if self.valid_data is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        iterators = self._iterators(self.valid_data, 0)
        loss_sum = tokens = 0.0
        for _ in range(self.job.train.eval_iters):
            s, n = self._forward_backward(iterators, forward_only=True)
            loss_sum, tokens = loss_sum + s, tokens + n
        for chunk in self.chunks:
            chunk.train()
        loss = loss_sum / max(tokens, 1.0)
        return {"loss": loss, "ppl": float(np.exp(min(loss, 50.0)))}

    # ------------------------------------------------------------------ the loop

    def save(self) -> str:
        path = self.checkpointer.save(
            self.step,
            self.chunks,
            self.optimizer,
            self.scheduler,
            {"step": self.step, "consumed_samples": self.consumed_samples},
            self.record,
            self.job.to_dict(),
        )
        if self.checkpointer.async_saves is None:
            log.info("saved checkpoint %s", path)
        else:
            log.info("saving checkpoint %s in the background", path)
        return path

    def finish_saves(self, blocking: bool) -> None:
        """Commit the background saves that every rank has finished (``blocking``: wait for all)."""
        for path in self.checkpointer.finalize(blocking):
            log.info("saved checkpoint %s", path)

    def _init_weights_from(self, path: str) -> None:
        """Load model weights saved in any parallel layout; the optimizer's main params follow them."""
        ckpt = find_checkpoint(path)
        open_checkpoint(ckpt)
        load_weights(unwrap(self.chunks), ckpt)
        self.optimizer.reload_model_params()
        log.info("initialised weights from %s (optimizer, scheduler and data start fresh)", ckpt)

    def train(self) -> int:
        """Train to ``train.steps``; returns 0, or REQUEUE_EXIT_CODE after a signal and a checkpoint."""
        job, t = self.job, self.job.train
        ckpt_interval, log_interval = job.checkpoint.interval, job.logging.interval
        tokens_per_step = self.global_batch * self.seq_length
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        last_saved = self.step if self.step else None
        exit_code = 0
        if self.signals is not None and self.signals.any_rank_received(self.device):
            log.warning(
                "exit signal (%s) during start-up: step %d is what is on disk; exit %d for requeue",
                self.signals.received or "on another rank",
                self.step,
                REQUEUE_EXIT_CODE,
            )
            self.metrics.close()
            return REQUEUE_EXIT_CODE
        for chunk in self.chunks:
            chunk.train()
        while self.step < t.steps:
            record = self.train_step()
            self.finish_saves(blocking=False)
            self.step += 1
            self.consumed_samples += self.global_batch
            record["step"] = self.step
            self.history.append(record)
            window.append(record)

            if self.step % log_interval == 0 or self.step == t.steps or self.step == 1:
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / len(window)
                tflops = self.flops_per_step / step_time / self.world_size / 1e12
                self.metrics.write(
                    {
                        "kind": "train",
                        "step": self.step,
                        "steps": t.steps,
                        "loss": float(np.mean([r["loss"] for r in window])),
                        "lr": record["lr"],
                        "grad_norm": record["grad_norm"],
                        "skipped": sum(r["skipped"] for r in window),
                        "tokens_per_s": tokens_per_step / step_time,
                        "tflops_per_gpu": tflops,
                        "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                        "memory_gib": memory_gib(),
                        "step_time_s": step_time,
                        "consumed_samples": self.consumed_samples,
                    }
                )
                window, window_start = [], time.perf_counter()

            paused = time.perf_counter()  # validation time is not step time: the window skips it
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                result = self.evaluate()
                if result is not None:
                    self.metrics.write({"kind": "valid", "step": self.step, **result})
            if job.eval.interval and (self.step % job.eval.interval == 0 or self.step == t.steps):
                result = self.position_eval.evaluate(self.chunks, self.device)
                self.metrics.write({"kind": "eval", "step": self.step, **result})
            window_start += time.perf_counter() - paused

            if self.signals is not None and self.signals.any_rank_received(self.device):
                log.warning(
                    "exit signal (%s) received: checkpointing at step %d, then exit %d for requeue",
                    self.signals.received or "on another rank",
                    self.step,
                    REQUEUE_EXIT_CODE,
                )
                self.save()
                exit_code = REQUEUE_EXIT_CODE
                break
            if ckpt_interval and self.step % ckpt_interval == 0 and self.step < t.steps:
                paused = time.perf_counter()
                self.save()
                last_saved = self.step
                window_start += time.perf_counter() - paused
        else:
            if job.checkpoint.save_at_end and last_saved != self.step:
                self.save()
        self.finish_saves(blocking=True)  # before any exit, the requeue exit included
        self.metrics.close()
        return exit_code

    def close(self) -> None:
        if self.signals is not None:
            self.signals.uninstall()


def _setup_logging(is_logging_rank: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_logging_rank else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("megatron").setLevel(logging.WARNING if is_logging_rank else logging.ERROR)
