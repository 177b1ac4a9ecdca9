"""``python tools/convert.py ...`` is ``longnet-convert ...`` (the CLI lives in longnet_megatron.export.cli)."""

from longnet_megatron.export.cli import main

if __name__ == "__main__":
    main()
