"""The one error type conversions raise for bad inputs; the CLI turns it into a click error."""


class ConversionError(ValueError):
    """A checkpoint or export folder that cannot be converted: the message names the path and the cause.

    ``kind`` is "missing", "truncated", "mismatched" or "foreign" (not a LongNet checkpoint at all).
    """

    def __init__(self, message: str, kind: str = "foreign"):
        super().__init__(message)
        self.kind = kind
