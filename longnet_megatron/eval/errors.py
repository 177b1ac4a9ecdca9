"""The evaluator's error: bad input named in one line (the command line prints it, no traceback)."""

from __future__ import annotations


class EvalError(ValueError):
    """An option, model or dataset that cannot be evaluated; the message names it and what to do."""
