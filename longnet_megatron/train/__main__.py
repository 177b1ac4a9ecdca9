"""``python -m longnet_megatron.train CONFIG [key=value ...]``: the ``longnet-train`` command."""

from longnet_megatron.train.cli import main

if __name__ == "__main__":
    main()
