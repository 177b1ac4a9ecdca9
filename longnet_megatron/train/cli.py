"""The ``longnet-train`` command line (also ``python -m longnet_megatron.train``)."""

from __future__ import annotations

import os
import sys

import click

from longnet_megatron.checkpoint import CheckpointError
from longnet_megatron.compat.warnings import quiet_third_party_warnings
from longnet_megatron.train.config import ConfigError, load_config
from longnet_megatron.train.signals import REQUEUE_EXIT_CODE, hold_exit_signals, release_exit_signals


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--check", is_flag=True, help="Validate the configuration (for the launcher's world size) and exit."
)
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
def main(config, overrides, check, print_config) -> None:
    """Pretrain a LongNet model: CONFIG (a YAML file) with section.field=value OVERRIDES.

    \b
    One process (CPU or one GPU):
      longnet-train configs/tiny_cpu.yaml train.steps=100 optim.lr=3e-3
    One node, 8 GPUs:
      launch/local.sh 8 configs/gpu_125m_32k.yaml parallel.context_parallel_size=2
    SLURM:
      sbatch --nodes=4 --gpus-per-node=8 launch/pretrain.sh configs/multinode_1b_256k.yaml

    The configuration is checked before any process group starts; an error names the key.
    Runs resume from CHECKPOINT_DIR/latest. On SIGTERM or SIGUSR1 a checkpoint is saved and the
    process exits with code 75 (the launch script requeues on it; a signal during start-up: exit 75
    with nothing to save). docs/training.md is the manual.
    """
    hold_exit_signals()  # a signal during start-up waits for the trainer (python -m holds them earlier)
    if config and "=" in config and not os.path.exists(config):  # no CONFIG, only overrides
        config, overrides = None, (config, *overrides)
    # Megatron-Core (imported by what follows) warns on import: the filters go first.
    quiet_third_party_warnings()
    from longnet_megatron.train.distributed import shutdown_distributed, world_from_env
    from longnet_megatron.train.job import resolve_job
    from longnet_megatron.train.reaper import start_reaper
    from longnet_megatron.train.trainer import Trainer

    world = world_from_env()
    try:
        resolved = resolve_job(load_config(config, overrides), world.world_size)
    except ConfigError as e:
        if world.rank == 0:
            click.echo(f"longnet-train: configuration error: {e}", err=True)
        sys.exit(2)
    if not resolved.config.train.exit_signal_handling:
        release_exit_signals()
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(resolved.config.to_dict(), sort_keys=False))
        return
    if check:
        click.echo(f"configuration OK for {world.world_size} rank(s)")
        return

    start_reaper()  # helpers the trainer starts die with it, even on kill -9
    try:
        trainer = Trainer(resolved, world)
        code = trainer.train()
        trainer.close()
    except ConfigError as e:  # what only the machine can tell (FP8 on this GPU)
        if world.rank == 0:
            click.echo(f"longnet-train: configuration error: {e}", err=True)
        sys.exit(2)
    except CheckpointError as e:
        if world.rank == 0:
            prefix = "cannot save" if e.kind == "unwritable" else f"{e.kind} checkpoint"
            click.echo(f"longnet-train: {prefix}: {e}", err=True)
        sys.exit(1)
    finally:
        shutdown_distributed()
    if code == REQUEUE_EXIT_CODE and world.rank == 0:
        click.echo(
            f"longnet-train: stopped by a signal; exit {REQUEUE_EXIT_CODE} (requeue: it resumes from `latest`)",
            err=True,
        )
    sys.exit(code)
