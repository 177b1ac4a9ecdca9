"""``python -m longnet_megatron.train CONFIG [key=value ...]``: the ``longnet-train`` command."""

from longnet_megatron.train.signals import hold_exit_signals

if __name__ == "__main__":
    # First: the command's imports (torch, Megatron-Core) take seconds, and a signal meanwhile (Slurm's
    # warning with a short --time) must wait for the trainer instead of killing the process.
    hold_exit_signals()
    from longnet_megatron.train.cli import main

    main()
