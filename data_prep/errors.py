"""The one exception type of data preparation.

It is a ``click.ClickException`` so the command line prints its message (no traceback) and exits
with status 1, while library callers (the trainer, tests) can catch it like any exception.
"""

from __future__ import annotations

import click


class PrepError(click.ClickException):
    """Bad input, bad options or an output in the way; the message names the file and what to do."""
