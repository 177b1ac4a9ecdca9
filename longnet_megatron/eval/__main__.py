"""``python -m longnet_megatron.eval``: the ``longnet-eval`` command line."""

import sys

from longnet_megatron.eval.cli import main

sys.exit(main())
